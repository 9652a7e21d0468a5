"""BlockDiffusionLM: a DiT-style transformer for block diffusion, compatible with BD3-LM.

Read top to bottom: one transformer block (DiTBlock), the output layer, then the model with
its ways to run:

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

from did_engine import ops
from did_engine.modeling import checkpoint
from did_engine.modeling.config import PRESETS, ModelConfig
from did_engine.modeling.kv_cache import BlockKVCache
from did_engine.modeling.layers import (LayerNorm, Rotary, TimestepEmbedder, TokenEmbedding, apply_rotary,
                                        block_causal_mask, block_diffusion_attention, modulate,
                                        resolve_training_attention, sdpa)

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


class BlockDiffusionLM(nn.Module):
    """Block diffusion language model (BD3-LM architecture). See the module docstring."""

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
        # The training forward's attention: None reads DID_ENGINE_TRAIN_ATTENTION (default
        # auto: compiled FlexAttention on CUDA, dense-mask SDPA elsewhere); or one of
        # TRAINING_ATTENTION_CHOICES. last_training_attention names the path the last
        # training forward took: sdpa-dense, flex-compiled or flex-eager.
        self.training_attention: str | None = None
        self.last_training_attention: str | None = None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BlockDiffusionLM":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(ModelConfig(**{**PRESETS[name], **overrides}))

    @property
    def mask_id(self) -> int:
        return self.config.mask_id

    @property
    def device(self) -> torch.device:
        return self.vocab_embed.embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vocab_embed.embedding.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- shared pieces ------------------------------------------------------------------

    def _conditioning(self, batch_size: int, sigma, device):
        """c = silu(timestep_embedding(sigma)), [B, cond_dim]; sigma is zeroed unless time-conditioned."""
        if not self.config.adaln:
            return None
        if sigma is None or not self.config.time_conditioning:
            sigma = torch.zeros(batch_size, device=device)
        sigma = torch.as_tensor(sigma, device=device, dtype=torch.float32).expand(batch_size)
        return F.silu(self.sigma_map(sigma))

    def _run(self, tokens, sigma, attend_for_layer, logit_positions=None):
        """Embed, run every block with attend_for_layer(i) as its attention, return logits
        [B, S, V], or [M, V] at the M true positions of logit_positions [B, S] (row-major)."""
        x = self.vocab_embed(tokens)  # [B, S, dim]
        c = self._conditioning(tokens.shape[0], sigma, tokens.device)
        for i, block in enumerate(self.blocks):
            x = block(x, c, attend_for_layer(i))
        if logit_positions is not None:
            # The output layer is a large share of a forward with a big vocabulary: run it
            # only where logits are wanted (the masked positions, when sampling).
            if logit_positions.shape != tokens.shape or logit_positions.dtype != torch.bool:
                raise ValueError(f"logit_positions must be a bool tensor of the tokens' shape {tuple(tokens.shape)}")
            if c is not None:
                c = c[logit_positions.nonzero()[:, 0]]  # [M, cond_dim]
            x = x[logit_positions]  # [M, dim]
        return self.output_layer(x, c)  # [B, S, V] or [M, V]

    def _check_tokens(self, tokens, name="tokens"):
        if not torch.is_tensor(tokens) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an int64 tensor [B, S], got "
                             f"{tuple(tokens.shape) if torch.is_tensor(tokens) else type(tokens).__name__}")

    # -- forwards -----------------------------------------------------------------------

    # The sampler may ask decode() and the block-causal/global forwards for logits at some
    # positions only (logit_positions=[B, S] bool -> [M, V]).
    supports_logit_positions = True

    def forward(self, tokens, x0=None, block_size: int | None = None, sigma=None, logit_positions=None):
        """Raw logits [B, L, V] ([M, V] at the true positions of logit_positions, when given;
        not for the training forward).

        - ``model(x_t, x0=x_0, block_size=b)``: training forward over cat(x_t, x_0) under
          :func:`block_diffusion_mask` (dense-mask SDPA on a CPU, compiled FlexAttention on
          CUDA: see ``training_attention``); logits of the x_t half. With b >= L the x_0 half
          would be unused, so it is skipped (a global forward on x_t).
        - ``model(tokens, block_size=b)``: block-causal, no cache.
        - ``model(tokens)``: global bidirectional.
        """
        self._check_forward_args(tokens, x0, block_size, logit_positions)
        B, L = tokens.shape
        if x0 is not None:
            if block_size < L:
                return self._training_forward(tokens, x0, block_size, sigma)
            x0 = None  # B = L: the x_0 half is useless, run a global forward on x_t
        positions = torch.arange(L, device=tokens.device)
        cos, sin = self.rotary_emb.cos_sin(positions)
        if block_size is None or block_size >= L:
            def attend(q, k, v):
                return sdpa(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
        elif torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # Differentiable path (the op is forward-only): SDPA with a dense mask.
            mask = block_causal_mask(L, block_size, device=tokens.device)  # [L, L]

            def attend(q, k, v):
                return sdpa(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, mask)
        else:
            def attend(q, k, v):
                return ops.block_causal_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, block_size)
        return self._run(tokens, sigma, lambda i: attend, logit_positions)

    def _check_forward_args(self, tokens, x0, block_size, logit_positions) -> None:
        """forward()'s arguments: tokens (and x0) [B, L] ids; the training forward (x0 given)
        needs block_size and takes no logit_positions."""
        self._check_tokens(tokens)
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if x0 is not None:
            self._check_tokens(x0, "x0")
            if x0.shape != tokens.shape:
                raise ValueError(f"x0 {tuple(x0.shape)} must have x_t's shape {tuple(tokens.shape)}")
            if block_size is None:
                raise ValueError("the training forward needs block_size")
            if logit_positions is not None:
                raise ValueError("logit_positions is for sampling forwards, not the training forward")

    def _training_forward(self, x_t, x0, block_size, sigma):
        B, L = x_t.shape
        positions = torch.arange(L, device=x_t.device).repeat(2)  # both halves use 0..L-1
        cos, sin = self.rotary_emb.cos_sin(positions)
        path = resolve_training_attention(self.training_attention, x_t.device)

        def attend(q, k, v):  # [B, 2L, H, D]
            out, self.last_training_attention = block_diffusion_attention(
                apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, L, block_size, path)
            return out

        logits = self._run(torch.cat([x_t, x0], dim=1), sigma, lambda i: attend)
        return logits[:, :L]

    # -- KV-cached sampling --------------------------------------------------------------

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

    def _check_block(self, block_tokens, cache: BlockKVCache):
        self._check_tokens(block_tokens, "block_tokens")
        if block_tokens.shape[0] != cache.batch_size:
            raise ValueError(f"block_tokens has batch {block_tokens.shape[0]} but the cache has {cache.batch_size}")

    def decode(self, block_tokens, cache: BlockKVCache, sigma=None, logit_positions=None):
        """Logits [B, n, V] of the active block against the cache ([M, V] at the true
        positions of logit_positions [B, n], when given); the cache is unchanged.

        Queries are computed for the n block tokens only; cached keys are used as stored.
        """
        self._check_block(block_tokens, cache)
        n = block_tokens.shape[1]
        if n > cache.capacity:
            raise ValueError(f"a block of {n} tokens exceeds the cache capacity {cache.capacity}")
        cos, sin = self.rotary_emb.cos_sin(cache.positions(n))  # [B, n, 1, D/2]

        def attend_for_layer(i):
            def attend(q, k, v):
                return ops.block_decode_attention(apply_rotary(q, cos, sin), cache.k[i], cache.v[i],
                                                  apply_rotary(k, cos, sin), v, cache.lengths)
            return attend

        return self._run(block_tokens, sigma, attend_for_layer, logit_positions)

    @torch.no_grad()
    def commit(self, block_tokens, cache: BlockKVCache, sigma=None, block_size: int | None = None) -> None:
        """Append a finished block's K/V to the cache (one forward over the clean block).

        Each layer's keys/values are committed as soon as they are computed: the block's
        tokens attend to the cache and to each other, as x_0 blocks do in training. A chunk
        longer than ``block_size`` (a prompt) is the block-causal prefill: into an empty
        cache it runs as one forward with block-causal attention (``prefill_in_one_pass``;
        query block j sees key blocks 0..j, the same attention as committing block by
        block), otherwise block by block. When the cache is full, the oldest blocks slide
        out. Returns the number of forwards run.
        """
        self._check_block(block_tokens, cache)
        n = block_tokens.shape[1]
        step = block_size or n
        if n > step and self.prefill_in_one_pass and cache.known_empty and n <= cache.capacity:
            self._prefill(block_tokens, cache, sigma, step)
            return 1
        for start in range(0, n, step):
            chunk = block_tokens[:, start : start + step]
            cache.make_room(chunk.shape[1], block_size=self.config.block_size)
            cos, sin = self.rotary_emb.cos_sin(cache.positions(chunk.shape[1]))

            def attend_for_layer(i):
                def attend(q, k, v):
                    k = apply_rotary(k, cos, sin)
                    out = ops.block_decode_attention(apply_rotary(q, cos, sin), cache.k[i], cache.v[i], k, v,
                                                     cache.layer_lengths(i))
                    cache.commit_layer(i, k, v)
                    return out
                return attend

            self._run_without_head(chunk, sigma, attend_for_layer)
        return -(-n // step)

    # A prompt of several blocks goes into an empty cache in one block-causal forward
    # (False: block by block, one forward each; the prefill benchmark compares the two).
    prefill_in_one_pass = True

    def _prefill(self, tokens, cache: BlockKVCache, sigma, block_size: int) -> None:
        """One forward over a prompt [B, P] into an empty cache: block-causal attention, then
        each layer's K/V (after rotary) committed at once."""
        cache.make_room(tokens.shape[1], block_size=self.config.block_size)
        cos, sin = self.rotary_emb.cos_sin(cache.positions(tokens.shape[1]))  # [B, P, 1, D/2]

        def attend_for_layer(i):
            def attend(q, k, v):  # [B, P, H, D]
                k = apply_rotary(k, cos, sin)
                out = ops.block_causal_attention(apply_rotary(q, cos, sin), k, v, block_size)
                cache.commit_layer(i, k, v)
                return out
            return attend

        self._run_without_head(tokens, sigma, attend_for_layer)

    # The sampler may fold a commit into the next block's first decode call.
    supports_commit_and_decode = True

    @torch.no_grad()
    def commit_and_decode(self, clean_tokens, block_tokens, cache: BlockKVCache, sigma=None, logit_positions=None):
        """``commit(clean_tokens, cache)`` then ``decode(block_tokens, cache)`` in one forward.

        Both blocks go through each layer's projections and MLP together, so the weights are
        read once instead of twice (decoding at small batch is weight-read bound). Attention
        keeps the two calls' semantics exactly::

                         cache   clean   block
            clean rows     x       x       .      (the commit: the clean block never sees
            block rows     x       x       x       the masked one)

        Each layer commits the clean block's K/V before the block rows attend, so the cache
        afterwards is the one ``commit`` leaves. Returns the block's logits [B, n, V], or
        [M, V] at the true positions of logit_positions [B, n].
        """
        self._check_block(clean_tokens, cache)
        self._check_block(block_tokens, cache)
        n1, n2 = clean_tokens.shape[1], block_tokens.shape[1]
        if logit_positions is not None and (logit_positions.shape != block_tokens.shape
                                            or logit_positions.dtype != torch.bool):
            raise ValueError(f"logit_positions must be a bool tensor of the block's shape {tuple(block_tokens.shape)}")
        cache.make_room(n1, block_size=self.config.block_size)
        if n2 > cache.capacity:
            raise ValueError(f"a block of {n2} tokens exceeds the cache capacity {cache.capacity}")
        cos, sin = self.rotary_emb.cos_sin(cache.positions(n1 + n2))  # [B, n1 + n2, 1, D/2]

        def attend_for_layer(i):
            def attend(q, k, v):
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # [B, n1 + n2, H, D]
                lengths = cache.layer_lengths(i)
                clean = ops.block_decode_attention(q[:, :n1], cache.k[i], cache.v[i], k[:, :n1], v[:, :n1], lengths)
                cache.commit_layer(i, k[:, :n1], v[:, :n1])  # advances lengths by n1
                block = ops.block_decode_attention(q[:, n1:], cache.k[i], cache.v[i], k[:, n1:], v[:, n1:], lengths)
                return torch.cat([clean, block], dim=1)
            return attend

        B = block_tokens.shape[0]
        wanted = torch.ones_like(block_tokens, dtype=torch.bool) if logit_positions is None else logit_positions
        need = torch.cat([torch.zeros(B, n1, dtype=torch.bool, device=wanted.device), wanted], dim=1)
        logits = self._run(torch.cat([clean_tokens, block_tokens], dim=1), sigma, attend_for_layer, need)
        return logits if logit_positions is not None else logits.view(B, n2, -1)

    @torch.no_grad()
    def refine_forward(self, tokens, context: BlockKVCache, positions=None, write=None, sigma=None,
                       logit_positions=None):
        """Global bidirectional forward that keeps every layer's K/V in ``context``, then
        re-runs only some positions against them (approximate refinement steps).

        - ``positions=None``: the global forward ``model(tokens)`` (the same logits); each
          layer's K/V of all L tokens are written to ``context`` (capacity >= L).
        - ``positions`` int64 [B, r]: only the tokens at those positions go through the
          layers; each layer overwrites their K/V in ``context`` (where ``write`` [B, r] is
          true; default everywhere) and their queries attend over all L stored keys::

                             stored keys (positions 0 .. L-1)
              query rows r   x x x x x x x x   (no mask; rows not re-run keep the K/V
                                                of the last pass that computed them)

          Exact while the other positions' tokens are unchanged since their K/V were
          stored; when positions were re-filled in between, the others' K/V are stale
          (the approximation that makes a refine step cost r / L of a full one).

        Returns logits [B, S, V] (S = L or r), or [M, V] at logit_positions ([B, S] bool).
        """
        self._check_refine_args(tokens, context, positions, write)
        B, L = tokens.shape
        if positions is None:
            rows, where = tokens, torch.arange(L, device=tokens.device)[None]  # [1, L]: shared by every row
        else:
            rows, where = tokens.gather(1, positions), positions
            if positions.shape[1] == 0:  # nothing to re-run
                V = self.config.vocab_size
                return tokens.new_zeros((0, V) if logit_positions is not None else (B, 0, V), dtype=self.dtype)
        cos, sin = self.rotary_emb.cos_sin(where)  # [B or 1, S, 1, D/2]
        batch_index = torch.arange(B, device=tokens.device)[:, None].expand_as(where) if positions is not None else None

        def attend_for_layer(i):
            def attend(q, k, v):
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # [B, S, H, D]
                if positions is None:
                    context.k[i, :, :L], context.v[i, :, :L] = k, v
                    return sdpa(q, k, v)
                keep = slice(None) if write is None else write
                context.k[i][batch_index[keep], where[keep]] = k[keep]
                context.v[i][batch_index[keep], where[keep]] = v[keep]
                return sdpa(q, context.k[i, :, :L], context.v[i, :, :L])
            return attend

        logits = self._run(rows, sigma, attend_for_layer, logit_positions)
        if positions is None:
            context.set_lengths(L)
        return logits

    def _check_refine_args(self, tokens, context: BlockKVCache, positions, write) -> None:
        """refine_forward()'s arguments: a context of the batch holding >= L tokens; positions
        int64 [B, r] in [0, L); write a bool mask of the positions' shape."""
        self._check_tokens(tokens)
        B, L = tokens.shape
        if context.batch_size != B or context.capacity < L:
            raise ValueError(f"context must hold batch {B} x {L} tokens, got batch {context.batch_size} x "
                             f"{context.capacity}")
        if positions is not None:
            if positions.dim() != 2 or positions.shape[0] != B or positions.dtype != torch.int64:
                raise ValueError(f"positions must be int64 [B={B}, r], got {tuple(positions.shape)} {positions.dtype}")
            if positions.numel() and (positions.min() < 0 or positions.max() >= L):
                raise ValueError(f"positions must lie in [0, {L})")
        if write is not None and (positions is None or write.shape != positions.shape):
            raise ValueError("write must be a bool tensor of the positions' shape (and comes with positions)")

    def _run_without_head(self, tokens, sigma, attend_for_layer):
        # The output layer does not affect any K/V: skip it.
        x = self.vocab_embed(tokens)
        c = self._conditioning(tokens.shape[0], sigma, tokens.device)
        for i, block in enumerate(self.blocks):
            x = block(x, c, attend_for_layer(i))

    # -- checkpoints ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, strict: bool = True) -> "BlockDiffusionLM":
        """Load our checkpoint format or a BD3-LM Hugging Face directory (config.json + model.safetensors)."""
        return checkpoint.load_pretrained(cls, path, device=device, dtype=dtype, strict=strict)

    def save_pretrained(self, path) -> None:
        """Write config.json + model.safetensors into directory `path` (atomically, no pickle)."""
        checkpoint.save_pretrained(self, path)
