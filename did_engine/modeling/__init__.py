"""Models: configuration, layers and masks, the BD3-LM DiT, the block KV cache, checkpoints."""

from did_engine.modeling.dit import PRESETS, BlockDiffusionLM, ModelConfig  # noqa: F401
from did_engine.modeling.kv_cache import BlockKVCache  # noqa: F401
