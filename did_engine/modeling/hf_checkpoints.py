"""Reading what people download: Hugging Face directories, hub names, GGUF files.

did_engine.modeling.loading.load_model is the entry point; here are the pieces it uses:

    resolve_model_path(name)     a local path as it is, else a hub repo id fetched (or found in
                                 the cache) by huggingface_hub.snapshot_download
    load_checkpoint(path)        the class a local checkpoint names:
        did_engine format          its model_class (BlockDiffusionLM or LlamaBlockDiffusionLM)
        BD3-LM (model_type bd3lm)  BlockDiffusionLM.from_pretrained
        sdar, Fast_dLLM_Qwen, llama, qwen2, qwen3, *.gguf   load_llama (see did_engine.modeling.llama)
    llama_config_from_hf(raw)    a Hugging Face config.json -> LlamaBlockConfig
    gguf_tokenizer(path)         the tokenizer transformers converts from a GGUF file

snapshot_download honours ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and ``HF_HOME``; only config,
tokenizer and safetensors files are fetched. Weights are read from safetensors only
(``model.safetensors`` or a sharded ``model.safetensors.index.json``), through
did_engine.modeling.checkpoint's checked reader; nothing is unpickled. A GGUF file is
dequantised by transformers' GGUF loader (``gguf_file=``). Names, shapes and dtypes are
checked against the config before the model is allocated.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch

from did_engine.modeling.checkpoint import (
    CONFIG_NAME,
    FORMAT,
    WEIGHT_DTYPES,
    WEIGHTS_NAME,
    CheckpointError,
    CheckpointNotFoundError,
    SafetensorsFile,
    checked_model_config,
    read_json_file,
    resolve_embedded,
)
from did_engine.errors import UserError
from did_engine.modeling.llama import LlamaBlockConfig, LlamaBlockDiffusionLM

__all__ = ["load_checkpoint", "load_llama", "resolve_model_path", "llama_config_from_hf", "gguf_tokenizer"]

WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MAX_INDEX_BYTES = 16 << 20  # a sharded index lists every tensor name: ~100 KB for a 7B model
# What snapshot_download fetches: configs and tokenizer files, safetensors weights and their
# index. Pickled weights (*.bin, *.pt) are never read, so never downloaded.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# Block diffusion checkpoints: model_type -> (logit_shift, the mask token in their tokenizer).
BLOCK_DIFFUSION_TYPES = {"sdar": (False, "<|MASK|>"), "Fast_dLLM_Qwen": (True, "|<MASK>|")}
# Causal LMs, loaded for adaptation: logit shift on, a new mask token unless one is given.
CAUSAL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_TYPES = (*BLOCK_DIFFUSION_TYPES, *CAUSAL_TYPES)
DEFAULT_BLOCK_SIZE = 4


# ---------------------------------------------------------------------------------------
# Where a model is


def resolve_model_path(name_or_path, cache_dir=None, revision: str | None = None) -> str:
    """A local directory or file as it is; otherwise a hub repo id, fetched (or found in the
    cache) by ``huggingface_hub.snapshot_download``; returns the local snapshot directory."""
    path = os.fspath(name_or_path)
    if os.path.exists(path):
        return path
    if not HUB_NAME.fullmatch(path):
        raise CheckpointNotFoundError(f"{path!r} is neither a local path nor a Hugging Face hub name (org/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:
        raise UserError(f"{path!r} looks like a Hugging Face hub name; loading one needs huggingface_hub "
                        "(pip install huggingface_hub)") from None
    try:
        return snapshot_download(path, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS)
    except (OSError, ValueError, CachedRepoTreeNotFoundError) as exc:
        raise CheckpointNotFoundError(f"could not get {path!r} from the Hugging Face hub or its cache "
                                      f"({type(exc).__name__}: {first_line(exc)})") from None


def load_checkpoint(path: str, device=None, dtype=None, **options):
    """The model of the checkpoint at local ``path`` (a directory or a .gguf file), of the
    class it names (see the module docstring). ``options`` (mask_id, block_size) go to
    load_llama; a DiT checkpoint takes none."""
    from did_engine.modeling import BlockDiffusionLM

    from did_engine.modeling.adapters import is_adapter_dir

    if os.path.isfile(path) or is_adapter_dir(path):
        return load_llama(path, device=device, dtype=dtype, **options)
    raw = _read_config(path)
    if raw.get("format") == FORMAT:
        kind = raw.get("model_class", "BlockDiffusionLM")
    else:
        kind = "BlockDiffusionLM" if raw.get("model_type") in (None, "bd3lm") else "LlamaBlockDiffusionLM"
    if kind == "BlockDiffusionLM":
        if options:
            raise UserError(f"{', '.join(sorted(options))}: options of Llama-family models, not of BD3-LM's")
        return BlockDiffusionLM.from_pretrained(path, device=device, dtype=dtype)
    return load_llama(path, device=device, dtype=dtype, **options)


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.lexists(path):
        raise CheckpointNotFoundError(f"{path} not found: a model directory holds {CONFIG_NAME} and safetensors "
                                      "weights")
    raw = read_json_file(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return raw


# ---------------------------------------------------------------------------------------
# Configs


def llama_config_from_hf(raw: dict, source: str, directory: str | None = None, mask_id: int | None = None,
                         block_size: int | None = None) -> tuple[LlamaBlockConfig, bool]:
    """A Hugging Face config.json object -> (LlamaBlockConfig, whether a mask row is added).

    The mask id comes from ``mask_id``, else the config (``mask_token_id``), else the
    tokenizer.json in ``directory`` (the family's mask token); a causal LM without one gets
    a new row (id = its vocab size). The block size comes from ``block_size``, else the
    config (``block_size``, ``bd_size``), else 4.
    """
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        moe = isinstance(model_type, str) and ("moe" in model_type.lower() or model_type == "mixtral")
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported"
                              f"{' (mixture of experts)' if moe else ''}; supported: {', '.join(SUPPORTED_TYPES)}")
    _refuse_unsupported(raw, source)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in raw:
            raise CheckpointError(f"{source} lacks {key}")
    shift, mask_token = BLOCK_DIFFUSION_TYPES.get(model_type, (True, None))
    added_row = False
    if mask_id is None:
        mask_id = raw.get("mask_token_id", raw.get("mask_id"))
    if mask_id is None and mask_token is not None:
        mask_id = _token_id(directory, mask_token)
        if mask_id is None:
            raise CheckpointError(f"{source}: no mask id is known: the config has no mask_token_id and "
                                  f"{os.path.join(directory or '.', 'tokenizer.json')} has no {mask_token!r} token; "
                                  "pass mask_id")
    vocab_size = raw["vocab_size"]
    if mask_id is None:  # a causal LM: the mask becomes a new token
        mask_id, added_row = vocab_size, True
        vocab_size += 1
    if block_size is None:
        block_size = raw.get("block_size", raw.get("bd_size", DEFAULT_BLOCK_SIZE))
    qwen2 = model_type in ("qwen2", "Fast_dLLM_Qwen")
    bias = bool(raw.get("attention_bias", False))
    rope = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    fields = dict(
        vocab_size=vocab_size, hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads"), head_dim=raw.get("head_dim"),
        model_length=raw.get("max_position_embeddings") or 2048,
        rope_theta=raw.get("rope_theta") or rope.get("rope_theta") or 10000.0,
        rms_norm_eps=raw.get("rms_norm_eps") or 1e-6,
        # Qwen2: q/k/v always carry a bias, o_proj never; Llama and Qwen3: attention_bias for all four.
        qkv_bias=qwen2 or bias, o_bias=bias and not qwen2, mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "sdar"), tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        logit_shift=shift, mask_id=mask_id, block_size=block_size,
        extra={"source_format": model_type, "added_mask_row": added_row,
               **{k: raw[k] for k in ("bos_token_id", "eos_token_id") if raw.get(k) is not None}})
    try:
        return LlamaBlockConfig(**fields), added_row
    except UserError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def _refuse_unsupported(raw: dict, source: str) -> None:
    """Features this model does not implement, refused by name rather than ignored."""
    problems = []
    for key in ("rope_scaling", "rope_parameters"):
        value = raw.get(key)
        if value is None:
            continue
        kind = value.get("rope_type", value.get("type", "default")) if isinstance(value, dict) else value
        if kind != "default":
            problems.append(f"{key} {kind!r} (only plain rotary positions are supported)")
    if raw.get("use_sliding_window"):
        problems.append(f"sliding-window attention (use_sliding_window, window {raw.get('sliding_window')})")
    layer_types = raw.get("layer_types")
    if isinstance(layer_types, list) and any(t != "full_attention" for t in layer_types):
        problems.append("sliding-window layers (layer_types other than full_attention)")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if raw.get(key):
            problems.append(f"mixture of experts ({key} = {raw[key]})")
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {raw['hidden_act']!r} (SwiGLU with SiLU only)")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor {raw['partial_rotary_factor']} (rotary over whole heads only)")
    if problems:
        raise CheckpointError(f"{source}: unsupported: {'; '.join(problems)}")


def _token_id(directory: str | None, token: str) -> int | None:
    """The id of ``token`` in directory/tokenizer.json (None: no file or no such token)."""
    path = os.path.join(directory or "", "tokenizer.json")
    if directory is None or not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path).token_to_id(token)
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise CheckpointError(f"{path} is not a tokenizers JSON file: {exc}") from None


def _did_engine_config(raw: dict, source: str, mask_id, block_size) -> LlamaBlockConfig:
    """A did_engine checkpoint's config.json object -> its LlamaBlockConfig (checked as every
    did_engine checkpoint is), with the mask id and block size overridden where given."""
    config, _ = checked_model_config(LlamaBlockDiffusionLM, raw, source)
    overrides = {k: v for k, v in (("mask_id", mask_id), ("block_size", block_size)) if v is not None}
    if not overrides:
        return config
    try:
        return LlamaBlockConfig.from_dict({**config.to_dict(), **overrides}, unknown="error")
    except UserError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


# ---------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class TensorSource:
    """One stored tensor: its shape, whether it is floating point, and how to read it."""

    shape: tuple
    dtype: str
    read: Callable[[], torch.Tensor]


def _safetensors_sources(directory: str, files: contextlib.ExitStack) -> dict:
    """Every tensor of model.safetensors, or of the shards a model.safetensors.index.json
    lists (each through SafetensorsFile's checks; the files stay open in ``files``)."""
    index_path = os.path.join(directory, WEIGHTS_INDEX_NAME)
    if os.path.lexists(index_path):
        index = read_json_file(index_path, max_bytes=MAX_INDEX_BYTES)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if os.path.basename(shard) != shard or shard in (".", ".."):
                raise CheckpointError(f"{index_path}: shard {shard!r} is not a file name in {directory}")
    elif os.path.lexists(os.path.join(directory, WEIGHTS_NAME)):
        weight_map, shards = None, [WEIGHTS_NAME]
    else:
        pickled = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
        raise CheckpointNotFoundError(f"{directory} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}"
                                      + (f" (only {', '.join(sorted(pickled))}: pickled weights are never read)"
                                         if pickled else ""))
    sources = {}
    for shard in shards:
        f = files.enter_context(SafetensorsFile(os.path.join(directory, shard)))
        for name, entry in f.entries.items():
            if weight_map is not None and weight_map.get(name) != shard:
                continue  # listed in another shard (or not at all): the index decides
            sources[name] = TensorSource(entry.shape, entry.dtype, lambda f=f, name=name: f.read(name))
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(sources))
        if absent:
            raise CheckpointError(f"{index_path} lists tensors its shards do not hold: {', '.join(absent[:8])}")
    return sources


_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


def _state_dict_sources(state: dict) -> dict:
    return {name: TensorSource(tuple(t.shape), _DTYPE_NAMES.get(t.dtype, str(t.dtype)), lambda t=t: t.detach())
            for name, t in state.items()}


def _is_ignored(name: str, config: LlamaBlockConfig) -> bool:
    """Stored tensors that are not weights of ours: rotary frequency buffers (older
    conversions save them), and the output matrix of a tied model saved twice."""
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


def build_llama(config: LlamaBlockConfig, sources: dict, origin: str, device=None, dtype=None,
                added_mask_row: bool = False) -> LlamaBlockDiffusionLM:
    """A LlamaBlockDiffusionLM holding the tensors of ``sources`` (name -> TensorSource),
    checked first against the names and shapes ``config`` implies (nothing allocated until
    they match). With ``added_mask_row`` the stored embedding (and untied output) matrices
    have one row fewer: the mask row is set to the mean embedding (and a zero output row)."""
    with torch.device("meta"):
        model = LlamaBlockDiffusionLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    grown = {"model.embed_tokens.weight", "lm_head.weight"} if added_mask_row else set()
    stored = {name: s for name, s in sources.items() if not _is_ignored(name, config)}

    def stored_shape(name):  # the shape the file must have for `name`
        rows, *rest = expected[name]
        return (rows - 1, *rest) if name in grown else expected[name]

    common = sorted(set(expected) & set(stored))
    problems = []
    for label, names in (("missing tensors", sorted(set(expected) - set(stored))),
                         ("unexpected tensors", sorted(set(stored) - set(expected))),
                         ("mis-shaped tensors", [f"{n}: stored {list(stored[n].shape)} vs model {list(stored_shape(n))}"
                                                 for n in common if tuple(stored[n].shape) != stored_shape(n)]),
                         ("tensors that are not floating point", [f"{n} ({stored[n].dtype})" for n in common
                                                                  if stored[n].dtype not in WEIGHT_DTYPES])):
        if names:
            problems.append(f"{label}: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    if problems:
        raise CheckpointError(f"{origin} does not match its config ({config.num_hidden_layers} layers, hidden "
                              f"{config.hidden_size}, vocab {config.vocab_size}): " + " | ".join(problems))

    # Allocate in the target dtype and device at once (a bf16 7B model never exists in fp32).
    model = model.to(dtype=dtype or torch.float32).to_empty(device=device or "cpu")
    target = model.state_dict()  # shares storage with the parameters
    with torch.no_grad():
        for name in expected:  # one tensor at a time: the peak is the model plus its largest tensor
            t = stored[name].read()
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{origin}: tensor {name!r} holds non-finite values "
                                      f"({int((~torch.isfinite(t)).sum())} of {t.numel()})")
            target[name][: t.shape[0]].copy_(t)
        if added_mask_row:
            embedding = target["model.embed_tokens.weight"]
            embedding[-1] = embedding[:-1].double().mean(0)
            if not config.tie_word_embeddings:
                target["lm_head.weight"][-1] = 0.0
    return model.eval()


# ---------------------------------------------------------------------------------------
# The Llama family


def load_llama(name_or_path, device=None, dtype=None, *, mask_id: int | None = None, block_size: int | None = None,
               cache_dir=None, revision: str | None = None) -> LlamaBlockDiffusionLM:
    """A LlamaBlockDiffusionLM from a did_engine checkpoint, a Hugging Face directory or hub
    name (model_type sdar, Fast_dLLM_Qwen, llama, qwen2, qwen3), or a .gguf file."""
    path = resolve_model_path(resolve_embedded(os.fspath(name_or_path)), cache_dir=cache_dir, revision=revision)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise CheckpointError(f"{path} is a file but not a .gguf: pass a model directory, a hub name or a GGUF file")
        return _load_gguf(path, device, dtype, mask_id, block_size)
    from did_engine.modeling.adapters import is_adapter_dir, load_adapted

    if is_adapter_dir(path):  # a delta checkpoint: its base with the adapter merged in
        if mask_id is not None or block_size is not None:
            raise UserError("mask_id, block_size: an adapter's are fixed by its config")
        return load_adapted(path, device=device, dtype=dtype)
    raw = _read_config(path)
    source = os.path.join(path, CONFIG_NAME)
    if raw.get("format") == FORMAT:
        config, added_row = _did_engine_config(raw, source, mask_id, block_size), False
    else:
        config, added_row = llama_config_from_hf(raw, source, path, mask_id, block_size)
        config.extra["source"] = os.path.abspath(path)  # where its tokenizer lies
    with contextlib.ExitStack() as files:
        return build_llama(config, _safetensors_sources(path, files), path, device, dtype, added_row)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _read_gguf(path: str, part: str):
    """transformers' reading of a GGUF file: ``part`` "model" (AutoModelForCausalLM,
    dequantised) or "tokenizer" (AutoTokenizer)."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"{path}: reading GGUF files needs transformers and gguf (pip install 'did_engine[eval]')") \
            from None
    directory, name = os.path.split(os.path.abspath(path))
    auto = transformers.AutoModelForCausalLM if part == "model" else transformers.AutoTokenizer
    try:
        return auto.from_pretrained(directory, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: transformers could not read this GGUF file's {part}: {first_line(exc)}") \
            from None


def gguf_tokenizer(path: str):
    """The did_engine Tokenizer of a GGUF file's vocabulary, as transformers converts it (the
    tokenizer.json its save_pretrained would write)."""
    from did_engine.data.tokenizer import Tokenizer

    converted = _read_gguf(path, "tokenizer")
    return Tokenizer(converted.backend_tokenizer, "bpe", {"loaded_from": os.path.abspath(path)})


def _load_gguf(path: str, device, dtype, mask_id, block_size) -> LlamaBlockDiffusionLM:
    """Dequantise a GGUF file with transformers' GGUF loader, then take its config and weights."""
    hf = _read_gguf(path, "model")
    directory = os.path.dirname(os.path.abspath(path))
    raw = hf.config.to_dict()
    config, added_row = llama_config_from_hf(raw, path, directory, mask_id, block_size)
    config.extra.update(source=path, source_file_format="gguf")
    return build_llama(config, _state_dict_sources(hf.state_dict()), path, device, dtype, added_row)
