"""did_engine: block diffusion language models with the Diffusion-in-Diffusion sampler.

Importing the package loads the compiled op library (``did_engine._C``), which registers
the ops under ``torch.ops.did_engine``; :mod:`did_engine.ops` wraps them.
"""

from __future__ import annotations

__version__ = "0.1.0"

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from did_engine import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "did_engine's compiled op library (did_engine._C) could not be loaded. Build it with "
        "`pip install --no-build-isolation -e .` against the torch you run with "
        f"(torch must be imported first and match the build). Original error: {exc}"
    ) from exc

from did_engine import ops  # noqa: E402
from did_engine._build_info import build_info  # noqa: E402
from did_engine.modeling import BlockDiffusionLM, BlockKVCache, ModelConfig  # noqa: E402
from did_engine.modeling.loading import load_model  # noqa: E402
from did_engine.modeling.llama import LlamaBlockConfig, LlamaBlockDiffusionLM  # noqa: E402
from did_engine.sampling import DiDSampler, GenerationResult, RefineStage, SamplerConfig, generate  # noqa: E402
from did_engine.diffusion import evaluate_nelbo  # noqa: E402
from did_engine.training.config import TrainConfig  # noqa: E402

__all__ = [
    "__version__", "build_info", "ops", "BlockDiffusionLM", "ModelConfig", "BlockKVCache",
    "LlamaBlockDiffusionLM", "LlamaBlockConfig", "load_model",
    "DiDSampler", "SamplerConfig", "RefineStage", "GenerationResult", "generate",
    "TrainConfig", "evaluate_nelbo",
]

