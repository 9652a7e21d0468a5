"""Model checkpoints: safetensors + JSON only (nothing is ever unpickled), written atomically.

Two directory formats are read:

- ours: ``config.json`` = {"format": "did_engine", "format_version": 1, "config": {...}}
  and ``model.safetensors`` with BlockDiffusionLM's parameter names;
- BD3-LM's Hugging Face format: ``config.json`` (``BD3LMConfig`` fields, model_type
  "bd3lm") and ``model.safetensors`` with names under ``backbone.``; tensors outside the
  backbone (``sampling_eps_min``/``max``) become metadata in ``config.extra``.
"""

from __future__ import annotations

import json
import os
import tempfile

from safetensors import safe_open
from safetensors.torch import save_file

from did_engine.errors import UserError

FORMAT = "did_engine"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(UserError):
    """A checkpoint that does not match the model it is loaded into."""


def atomic_write_bytes(path: str, write) -> None:
    """Call write(tmp_path) then rename over `path`: a reader never sees a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write_bytes(path, write)


def save_pretrained(model, path) -> None:
    os.makedirs(path, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    # Weights first, config last: a directory with a config.json always has matching weights.
    atomic_write_bytes(os.path.join(path, WEIGHTS_NAME), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_json(os.path.join(path, CONFIG_NAME),
                      {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict()})


def _read_safetensors(path: str) -> dict:
    tensors = {}
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    return tensors


def _bd3lm_config(raw: dict) -> dict:
    """Map BD3LMConfig fields onto ModelConfig fields (the names already agree)."""
    if raw.get("attn_backend") not in (None, "sdpa", "flex"):
        raise CheckpointError(f"unsupported BD3-LM attn_backend {raw['attn_backend']!r}")
    if raw.get("causal"):
        raise CheckpointError("causal (autoregressive) BD3-LM checkpoints are not block diffusion models")
    return raw


def _resolve_embedded(path: str) -> str:
    """A name of a model shipped in the package (e.g. "default") -> its directory; a real
    directory of that name takes precedence."""
    from did_engine.pretrained import EMBEDDED_MODELS, embedded_model_path

    if os.path.isdir(path) or path not in EMBEDDED_MODELS:
        return path
    directory = embedded_model_path(path)
    if not os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        raise FileNotFoundError(f"the embedded model {path!r} is missing from this installation ({directory}): "
                                "reinstall did_engine, or pass a checkpoint directory")
    return directory


def load_pretrained(cls, path, device=None, dtype=None, strict: bool = True):
    from did_engine.model import ModelConfig

    path = _resolve_embedded(os.fspath(path))
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: a checkpoint directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    with open(config_path) as f:
        raw = json.load(f)
    tensors = _read_safetensors(weights_path)

    if raw.get("format") == FORMAT:
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{config_path} has format_version {raw['format_version']}; this did_engine "
                                  f"reads up to {FORMAT_VERSION}: upgrade did_engine")
        config = ModelConfig.from_dict(raw["config"])
    elif raw.get("model_type") == "bd3lm" or any(k.startswith("backbone.") for k in tensors):
        config = ModelConfig.from_dict(_bd3lm_config(raw))
        metadata = {}
        renamed = {}
        for name, t in tensors.items():
            if name.startswith("backbone."):
                renamed[name[len("backbone."):]] = t
            else:
                metadata[name] = t.item() if t.numel() == 1 else t.tolist()
        config.extra.update(metadata)
        config.extra["source_format"] = "bd3lm"
        tensors = renamed
    else:
        raise CheckpointError(f"{path} is neither a did_engine checkpoint nor a BD3-LM Hugging Face directory")

    model = cls(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mis_shaped = sorted(f"{n}: checkpoint {tuple(tensors[n].shape)} vs model {tuple(expected[n].shape)}"
                        for n in set(expected) & set(tensors) if tensors[n].shape != expected[n].shape)
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped tensors: {'; '.join(mis_shaped)}")
    if mis_shaped or (strict and problems):
        raise CheckpointError(f"{path} does not match its config ({config.n_blocks} blocks, hidden "
                              f"{config.hidden_dim}, vocab {config.vocab_size}): " + " | ".join(problems))
    model.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=strict)
    model.eval()
    return model.to(device=device, dtype=dtype)
