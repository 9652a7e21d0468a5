"""Models: configuration, shared layers and masks, the BD3-LM DiT, the block KV cache, checkpoints.

    config.py      ModelConfig (BD3-LM's config.json fields), its checks, PRESETS
    layers.py      norms, embeddings, rotary, attention masks, the training attention paths
    dit.py         BlockDiffusionLM (the BD3-LM DiT) and its blocks
    kv_cache.py    BlockKVCache: K/V of committed blocks for decoding
    checkpoint.py  safetensors + JSON checkpoints (ours and BD3-LM's), checked before loading

Imports go one way: config, layers, kv_cache <- checkpoint <- dit.
"""

from did_engine.modeling.config import PRESETS, ModelConfig  # noqa: F401
from did_engine.modeling.dit import BlockDiffusionLM  # noqa: F401
from did_engine.modeling.kv_cache import BlockKVCache  # noqa: F401
