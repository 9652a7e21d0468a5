"""Models: configuration, shared layers and masks, the two model classes, the block KV cache, checkpoints.

    config.py          ModelConfig (BD3-LM's config.json fields), its checks, PRESETS
    layers.py          norms, embeddings, rotary, attention masks, the training attention paths
    base.py            BlockDiffusionBase: the forwards, decode, commit, refine over a model's hooks;
                       LastHiddenKVCache (the cache of a logit-shift model)
    dit.py             BlockDiffusionLM (the BD3-LM DiT) and its blocks
    llama.py           LlamaBlockDiffusionLM (Llama / Qwen2 / Qwen3 blocks) and LlamaBlockConfig
    kv_cache.py        BlockKVCache: K/V of committed blocks for decoding
    checkpoint.py      safetensors + JSON checkpoints (ours and BD3-LM's), checked before loading
    hf_checkpoints.py  Hugging Face directories, hub names and GGUF files of the Llama family
    loading.py         load_model: the one loader of every kind of model name, and its tokenizer

Imports go one way: config, layers, kv_cache <- checkpoint <- base <- dit <- llama <- hf_checkpoints <- loading.
"""

from did_engine.modeling.config import PRESETS, ModelConfig  # noqa: F401
from did_engine.modeling.dit import BlockDiffusionLM  # noqa: F401
from did_engine.modeling.kv_cache import BlockKVCache  # noqa: F401
