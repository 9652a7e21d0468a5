"""The one model loader: a checkpoint directory, an embedded model's name or preset:NAME.

Every command (generate, eval, ablate, train) and the trainer's resume go through here:

    load_model("runs/x/final")            a did_engine or BD3-LM Hugging Face directory
    load_model("default")                 a model shipped inside the package (did_engine.pretrained)
    load_model("preset:tiny")             random weights of a preset (for timing or training from scratch)
    load_tokenizer_beside("runs/x/final") its tokenizer.json, if any
    load_for_sampling(spec, device, dtype) both, as the sampling commands want them
    load_weights_into(model, directory)   a checkpoint's weights into an existing model (resume)
"""

from __future__ import annotations

import os

import torch

from did_engine.errors import UserError
from did_engine.modeling.config import PRESETS
from did_engine.modeling.dit import BlockDiffusionLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSpecError(UserError):
    """A model spec that names no directory, embedded model or preset."""


def _checked_dir(spec: str) -> str:
    """The directory ``spec`` names (an embedded model's name resolved), or ModelSpecError."""
    from did_engine.modeling.checkpoint import resolve_embedded
    from did_engine.pretrained import EMBEDDED_MODELS

    if not os.path.isdir(spec) and spec not in EMBEDDED_MODELS:
        raise ModelSpecError(f"--model {spec!r} is not a directory, an embedded model "
                             f"({', '.join(EMBEDDED_MODELS)}) or 'preset:NAME'")
    return resolve_embedded(spec)


def load_model(spec: str, *, device=None, dtype=None, **overrides) -> BlockDiffusionLM:
    """The model ``spec`` names, in eval mode, on ``device`` in ``dtype``.

    ``overrides`` replace config fields: for a preset any of them (vocab_size, model_length,
    dropout, ...); for a checkpoint only dropout, since the weights fix the rest. A preset's
    weights are drawn from torch's global generator: seed it first for reproducible ones.
    """
    if spec.startswith("preset:"):
        name = spec.split(":", 1)[1]
        if name not in PRESETS:
            raise ModelSpecError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
        model = BlockDiffusionLM.from_preset(name, **overrides)
    else:
        model = BlockDiffusionLM.from_pretrained(_checked_dir(spec))
        unknown = set(overrides) - {"dropout"}
        if unknown:
            raise ValueError(f"a checkpoint's {', '.join(sorted(unknown))} is fixed by its weights")
        if overrides:  # a fresh module with the new dropout, holding the loaded weights
            loaded = model
            model = BlockDiffusionLM(loaded.config, **overrides)
            model.load_state_dict(loaded.state_dict())
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer_beside(spec: str):
    """The Tokenizer of the tokenizer.json in the model's directory, or None (presets have none)."""
    if spec.startswith("preset:"):
        return None
    path = os.path.join(_checked_dir(spec), "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from did_engine.data.tokenizer import Tokenizer

    return Tokenizer.from_file(path)


def load_for_sampling(spec: str, device=None, dtype=None) -> tuple:
    """(model, tokenizer or None) for the sampling commands; a preset gets the weights of
    torch seed 0 and no dropout, so `--model preset:NAME` is the same model every run."""
    if spec.startswith("preset:"):
        torch.manual_seed(0)
        return load_model(spec, device=device, dtype=dtype, dropout=0.0), None
    return load_model(spec, device=device, dtype=dtype), load_tokenizer_beside(spec)


def load_weights_into(model: BlockDiffusionLM, directory: str) -> None:
    """Copy the weights of the checkpoint in ``directory`` into ``model`` (whose config they
    must fit), with the loader's checks for untrusted files."""
    model.load_state_dict(BlockDiffusionLM.from_pretrained(directory).state_dict())
