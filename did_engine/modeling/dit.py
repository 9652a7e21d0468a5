"""BlockDiffusionLM: a DiT-style transformer for block diffusion, compatible with BD3-LM.

Read top to bottom: one transformer block (DiTBlock), the output layer, then the model: its
layers and the hooks through which modeling.base.BlockDiffusionBase runs it:

    model(x_t, x0=x_0, block_size=b)   training: cat(x_t, x_0) under the block diffusion mask
    model(tokens, block_size=b)        block-causal, no cache
    model(tokens)                      global bidirectional
    model.decode(block, cache)         the active block against a KV cache (sampling)
    model.commit(block, cache)         append a finished block's K/V to the cache
    model.refine_forward(...)          a global forward that keeps its K/V for partial re-runs

All return raw logits (no SUBS parameterisation: see did_engine.diffusion.subs_logits).
Parameter names equal BD3-LM's backbone names, so BD3-LM checkpoints load directly. The
configuration is in config.py, the shared layers and masks in layers.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from did_engine.modeling import checkpoint
from did_engine.modeling.base import BlockDiffusionBase
from did_engine.modeling.config import PRESETS, ModelConfig
from did_engine.modeling.kv_cache import BlockKVCache
from did_engine.modeling.layers import LayerNorm, Rotary, TimestepEmbedder, TokenEmbedding, modulate

# ---------------------------------------------------------------------------------------
# One transformer block


class DiTBlock(nn.Module):
    """Pre-LN block with adaLN: x + g1 * attn(mod(LN(x))), then x + g2 * mlp(mod(LN(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.hidden_dim
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.adaln = cfg.adaln
        if cfg.adaln:
            self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * dim)

    def forward(self, x, c, attend):
        """x [B, S, dim]; c [B, cond_dim] or None; attend(q, k, v) -> [B, S, H, D] (q,k,v [B, S, H, D])."""
        if self.adaln:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
            h = modulate(self.norm1(x), shift1, scale1)
        else:
            h = self.norm1(x)
        B, S, _ = h.shape
        qkv = self.attn_qkv(h).view(B, S, 3, self.n_heads, -1)  # [B, S, 3, H, D]
        h = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(B, S, -1)  # [B, S, dim]
        h = F.dropout(self.attn_out(h), self.dropout, self.training)
        x = x + (gate1 * h if self.adaln else h)
        h = modulate(self.norm2(x), shift2, scale2) if self.adaln else self.norm2(x)
        h = F.dropout(self.mlp(h), self.dropout, self.training)
        return x + (gate2 * h if self.adaln else h)


class FinalLayer(nn.Module):
    """The output layer: LN (adaLN-modulated), then a linear map to the vocabulary: [.., dim] -> [.., V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_final = LayerNorm(cfg.hidden_dim)
        self.linear = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        self.adaln = cfg.adaln
        if cfg.adaln:
            self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.hidden_dim)

    def forward(self, x, c):
        """x [B, S, dim] with c [B, cond_dim], or packed rows x [M, dim] with their c [M, cond_dim]."""
        if self.adaln:
            mod = self.adaLN_modulation(c)
            shift, scale = (mod[:, None] if x.dim() == 3 else mod).chunk(2, dim=-1)
            x = modulate(self.norm_final(x), shift, scale)
        else:
            x = self.norm_final(x)
        return self.linear(x)


# ---------------------------------------------------------------------------------------
# The model


class BlockDiffusionLM(BlockDiffusionBase):
    """Block diffusion language model (BD3-LM architecture). See the module docstring; the
    forwards and sampling calls are BlockDiffusionBase's, over the hooks below."""

    config_class = ModelConfig

    def __init__(self, config: ModelConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = ModelConfig(**overrides)
        elif overrides:
            config = ModelConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        self.vocab_embed = TokenEmbedding(config.vocab_size, config.hidden_dim)
        if config.adaln:
            self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.rotary_emb = Rotary(config.head_dim, config.rotary_base)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.n_blocks))
        self.output_layer = FinalLayer(config)
        self._init_training_attention()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BlockDiffusionLM":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(ModelConfig(**{**PRESETS[name], **overrides}))

    # -- hooks ---------------------------------------------------------------------------

    def _conditioning(self, batch_size: int, sigma, device):
        """c = silu(timestep_embedding(sigma)), [B, cond_dim]; sigma is zeroed unless time-conditioned."""
        if not self.config.adaln:
            return None
        if sigma is None or not self.config.time_conditioning:
            sigma = torch.zeros(batch_size, device=device)
        sigma = torch.as_tensor(sigma, device=device, dtype=torch.float32).expand(batch_size)
        return F.silu(self.sigma_map(sigma))

    def _trunk(self, tokens, sigma, attend_for_layer):
        """Embed, run every block with attend_for_layer(i) as its attention -> (x [B, S, dim],
        c [B, cond_dim] or None)."""
        x = self.vocab_embed(tokens)  # [B, S, dim]
        c = self._conditioning(tokens.shape[0], sigma, tokens.device)
        for i, block in enumerate(self.blocks):
            x = block(x, c, attend_for_layer(i))
        return x, c

    def _output(self, hidden, cond):
        return self.output_layer(hidden, cond)  # [B, S, V] or [M, V]

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None) -> BlockKVCache:
        """A preallocated cache holding up to ``max_len`` committed tokens per row.

        The default, ``model_length - block_size``, makes the attention span of a decoded
        block (cache + the block itself) exactly the model's context, as in BD3-LM.
        """
        cfg = self.config
        if max_len is None:
            max_len = max(cfg.model_length - cfg.block_size, 1)
        return BlockKVCache(cfg.n_blocks, batch_size, max_len, cfg.n_heads, cfg.head_dim,
                            device=device or self.device, dtype=dtype or self.dtype)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, strict: bool = True) -> "BlockDiffusionLM":
        """Load our checkpoint format or a BD3-LM Hugging Face directory (config.json + model.safetensors)."""
        return checkpoint.load_pretrained(cls, path, device=device, dtype=dtype, strict=strict)
