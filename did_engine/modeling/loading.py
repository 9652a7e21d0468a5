"""The one model loader: presets, did_engine and Hugging Face checkpoints, GGUF files, hub names.

Every command (generate, eval, ablate, train), the trainer's resume and
``did_engine.load_model`` go through here::

    load_model("preset:tiny")             random weights of a DiT preset (timing, training from scratch)
    load_model("default")                 a model shipped inside the package (did_engine.pretrained)
    load_model("smollm2-135m")            the built-in judge, converted once into the cache (a causal LM)
    load_model("runs/x/final")            a checkpoint directory of either class, or a Hugging Face
                                          directory: BD3-LM, sdar, Fast_dLLM_Qwen, llama, qwen2, qwen3
    load_model("model.gguf")              a GGUF file (dequantised by transformers)
    load_model("org/name")                a Hugging Face hub name (huggingface_hub's cache, HF_HUB_OFFLINE)
    load_for_sampling(spec, device, dtype) the model and its tokenizer, as the sampling commands want them
    load_tokenizer_beside(spec)           the tokenizer that comes with the model, if any
    load_weights_into(model, directory)   a checkpoint's weights into an existing model (resume)

Which class a checkpoint becomes is decided by the checkpoint (modeling.hf_checkpoints):
BlockDiffusionLM for did_engine DiT and BD3-LM directories, LlamaBlockDiffusionLM for the
rest. The tokenizer is the ``tokenizer.json`` beside the weights; for a GGUF file, the one
transformers converts from it; 'smollm2-135m''s converted directory holds its own.
"""

from __future__ import annotations

import os

import torch

from did_engine.errors import UserError
from did_engine.modeling.checkpoint import CheckpointNotFoundError, resolve_embedded
from did_engine.modeling.config import PRESETS
from did_engine.modeling.dit import BlockDiffusionLM
from did_engine.modeling.hf_checkpoints import (HUB_NAME, first_line, gguf_tokenizer, load_checkpoint,
                                                resolve_model_path)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_DTYPE = "auto"


def resolve_dtype(name: str, device="cpu") -> torch.dtype:
    """A dtype name of DTYPES, or 'auto': bfloat16 where bf16 matmuls are fast on ``device``
    (a GPU, an AMX CPU; softmax and sampling still run in float32), float32 elsewhere."""
    if name == AUTO_DTYPE:
        from did_engine.hardware import fast_bf16

        return torch.bfloat16 if fast_bf16(device) else torch.float32
    if name not in DTYPES:
        raise UserError(f"dtype {name!r}: choose from {AUTO_DTYPE}, {', '.join(DTYPES)}")
    return DTYPES[name]
TOKENIZER_NAME = "tokenizer.json"


class ModelSpecError(CheckpointNotFoundError):
    """A model spec that names no path, embedded model, built-in name, preset or hub repo."""


# Built-in judges that are also models here (Llama family); gemma3-270m is only a judge.
BUILTIN_MODELS = ("smollm2-135m",)


def _builtin_names() -> tuple:
    from did_engine.pretrained import EMBEDDED_MODELS

    return tuple(EMBEDDED_MODELS), BUILTIN_MODELS


def locate(spec, cache_dir=None, revision: str | None = None) -> str:
    """The local directory or file of a model spec other than a preset: an existing path as
    it is, an embedded model's directory, the built-in judge's converted directory, or a hub
    repo's snapshot (downloaded or found in the cache); ModelSpecError for anything else."""
    name = os.fspath(spec)
    if os.path.exists(name):
        return name
    embedded, builtin = _builtin_names()
    if name in embedded:
        return resolve_embedded(name)
    if name in builtin:
        from did_engine.modeling.builtin import prepare_builtin_judge

        return prepare_builtin_judge(name)
    if not HUB_NAME.fullmatch(name):
        raise ModelSpecError(f"model {name!r} is not a directory or file, an embedded model ({', '.join(embedded)}), "
                             f"a built-in model ({', '.join(builtin)}), 'preset:NAME' or a Hugging Face hub name "
                             "(org/name)")
    return resolve_model_path(name, cache_dir=cache_dir, revision=revision)


def load_model(spec, device=None, dtype=None, *, mask_id: int | None = None, block_size: int | None = None,
               cache_dir=None, revision: str | None = None, **overrides):
    """The model ``spec`` names (see the module docstring), in eval mode, on ``device`` in ``dtype``.

    ``mask_id`` and ``block_size`` override a Llama-family checkpoint's (block_size also a
    preset's); ``cache_dir`` and ``revision`` go to the hub. ``overrides`` replace config
    fields: for a preset any of them (vocab_size, model_length, dropout, ...); for a DiT
    checkpoint only dropout, since the weights fix the rest. A preset's weights are drawn
    from torch's global generator: seed it first for reproducible ones.
    """
    spec = os.fspath(spec)
    if spec.startswith("preset:"):
        name = spec.split(":", 1)[1]
        if name not in PRESETS:
            raise ModelSpecError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
        if mask_id is not None:
            raise UserError("a preset's mask id is its last token (vocab_size - 1): set vocab_size instead")
        sizes = {} if block_size is None else {"block_size": block_size}
        model = BlockDiffusionLM.from_preset(name, **sizes, **overrides)
        return model.to(device=device, dtype=dtype).eval()
    options = {k: v for k, v in (("mask_id", mask_id), ("block_size", block_size)) if v is not None}
    model = load_checkpoint(locate(spec, cache_dir, revision), device=device, dtype=dtype, **options)
    if "dropout" in overrides and not isinstance(model, BlockDiffusionLM):
        raise UserError(f"{spec}: a {type(model).__name__} has no dropout: leave dropout unset")
    unknown = set(overrides) - {"dropout"}
    if unknown:
        raise UserError(f"{spec}: the {', '.join(sorted(unknown))} of a checkpoint is fixed by its weights")
    if overrides:  # a fresh module with the new dropout, holding the loaded weights
        loaded = model
        model = BlockDiffusionLM(loaded.config, **overrides)
        model.load_state_dict(loaded.state_dict())
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def tokenizer_of(path: str):
    """The Tokenizer that comes with the model at local ``path`` (a directory's tokenizer.json,
    a GGUF file's own vocabulary), or None when there is none."""
    from did_engine.data.tokenizer import Tokenizer

    if os.path.isfile(path):
        return gguf_tokenizer(path) if path.endswith(".gguf") else None
    file = os.path.join(path, TOKENIZER_NAME)
    if not os.path.isfile(file):
        return None
    try:
        return Tokenizer.from_file(file)
    except Exception as exc:  # tokenizers raises a bare Exception on a file it cannot read
        raise UserError(f"{file} is not a Hugging Face tokenizers file ({first_line(exc)})") from None


def load_for_sampling(spec: str, device=None, dtype=None) -> tuple:
    """(model, tokenizer or None) for the sampling commands; a preset gets the weights of
    torch seed 0 and no dropout, so `--model preset:NAME` is the same model every run."""
    if spec.startswith("preset:"):
        torch.manual_seed(0)
        return load_model(spec, device=device, dtype=dtype, dropout=0.0), None
    path = locate(spec)
    return load_model(path, device=device, dtype=dtype), tokenizer_of(path)


def vocabulary_mismatch(model, data_tokens: int, model_tokenizer=None) -> str | None:
    """Why token data of a tokenizer with ``data_tokens`` tokens does not fit ``model``, or
    None when it does: a DiT's vocabulary is the data's tokenizer + the mask; a Llama-family
    model's own tokenizer (``model_tokenizer``, when it has one) must have the data's size;
    without one, the data's ids must lie below the mask id. Both sizes are named."""
    vocab, mask = model.config.vocab_size, model.mask_id
    if isinstance(model, BlockDiffusionLM):
        fits, what = vocab == data_tokens + 1, f"{vocab} = tokenizer + mask"
    elif model_tokenizer is not None:
        fits, what = model_tokenizer.vocab_size == data_tokens, f"its tokenizer.json has {model_tokenizer.vocab_size}"
    else:
        fits, what = data_tokens <= mask, f"{vocab} with the mask at {mask}"
    if fits:
        return None
    return (f"the dataset's tokenizer has {data_tokens} tokens but the model's vocabulary does not match ({what}): "
            "prepare the data with the model's tokenizer")


def load_weights_into(model, directory: str) -> None:
    """Copy the weights of the checkpoint in ``directory`` into ``model`` (whose config they
    must fit), with the loader's checks for untrusted files."""
    model.load_state_dict(type(model).from_pretrained(directory).state_dict())
