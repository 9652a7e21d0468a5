"""A model wrapper that decodes without a KV cache: the independent path of the cached-draft tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class UncachedModel(torch.nn.Module):
    """The same model decoding without a cache: block-causal forward over everything so far."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.mask_id, self.config = model, model.mask_id, model.config

    def new_kv_cache(self, batch_size, max_len=None):
        return SimpleNamespace(tokens=torch.zeros(batch_size, 0, dtype=torch.int64))

    def decode(self, block, cache):
        seq = torch.cat([cache.tokens, block], 1)
        return self.inner(seq, block_size=self.inner.config.block_size)[:, -block.shape[1]:]

    def commit(self, block, cache, block_size=None):
        cache.tokens = torch.cat([cache.tokens, block], 1)

    def forward(self, tokens, block_size=None):
        return self.inner(tokens, block_size=block_size)
