"""Models shipped inside the package, loadable by name: ``BlockDiffusionLM.from_pretrained("default")``,
``did-engine generate --model default``.

Each is a directory beside this file holding config.json, model.safetensors, tokenizer.json
and a MODEL_CARD.md (how it was trained, on what, how well it does).
"""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))

# name -> directory under did_engine/pretrained/
EMBEDDED_MODELS = {"default": "default"}


def embedded_model_path(name: str) -> str | None:
    """The directory of the embedded model `name`, or None when there is no such model."""
    sub = EMBEDDED_MODELS.get(name)
    return None if sub is None else os.path.join(_HERE, sub)
