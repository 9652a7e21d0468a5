"""BlockDiffusionBase: what the two model classes share, around a few architectural hooks.

Every way to run a block diffusion LM is the same skeleton over a stack of layers whose
attention is a callable the skeleton passes in (``attend_for_layer(i)``)::

    model(x_t, x0=x_0, block_size=b)   training: cat(x_t, x_0) under the block diffusion mask
    model(tokens, block_size=b)        block-causal, no cache
    model(tokens)                      global bidirectional
    model.decode(block, cache)         the active block against a KV cache
    model.commit(block, cache)         append a finished block's K/V to the cache (a prompt: prefill)
    model.commit_and_decode(...)       both in one forward
    model.refine_forward(...)          a global forward that keeps its K/V for partial re-runs

A subclass provides the architecture through these hooks:

    _trunk(tokens, sigma, attend_for_layer)  -> (hidden [B, S, d], cond [B, c] or None): embed,
                                                run the layers (cond: the DiT's time conditioning)
    _output(hidden [..., d], cond [..., c])   -> logits [..., V]: the output layer
    rotary_emb.cos_sin(positions)             the rotary angles (apply_rotary's convention)
    logit_shift                               True: the logits at i - 1 predict token i. The base
                                              then aligns every output to the predicted position,
                                              with the cache's last committed hidden state
                                              (a LastHiddenKVCache) for row 0 of a block
    new_kv_cache, from_pretrained             the cache layout and the checkpoint readers
"""

from __future__ import annotations

import torch
import torch.nn as nn

from did_engine import ops
from did_engine.modeling import checkpoint
from did_engine.modeling.kv_cache import BlockKVCache
from did_engine.modeling.layers import (apply_rotary, block_causal_mask, block_diffusion_attention,
                                        resolve_training_attention, sdpa)


class LastHiddenKVCache(BlockKVCache):
    """A BlockKVCache that also keeps, per row, the final hidden state (before the output
    norm) of the last committed position: a logit-shift model predicts the first token of
    the next block from it. All zeros until something is committed, which makes that row's
    logits zero (RMSNorm of zero is zero and the output layer has no bias).

    ::

        last_hidden [B, hidden_size]
    """

    def __init__(self, n_layers: int, batch_size: int, capacity: int, n_heads: int, head_dim: int,
                 hidden_size: int, device=None, dtype=torch.float32):
        super().__init__(n_layers, batch_size, capacity, n_heads, head_dim, device=device, dtype=dtype)
        self.last_hidden = torch.zeros(batch_size, hidden_size, device=device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.last_hidden.numel() * self.last_hidden.element_size()

    def reset(self) -> None:
        super().reset()
        self.last_hidden.zero_()

    def copy_(self, other: "LastHiddenKVCache") -> "LastHiddenKVCache":
        super().copy_(other)
        self.last_hidden.copy_(other.last_hidden)
        return self


def _rotate(q, k, cos, sin):
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class BlockDiffusionBase(nn.Module):
    """The forwards, the KV-cached sampling calls and the checks shared by BlockDiffusionLM
    and LlamaBlockDiffusionLM (see the module docstring for the hooks)."""

    # The sampler may ask decode() and the block-causal/global forwards for logits at some
    # positions only (logit_positions=[B, S] bool -> [M, V]), and fold a commit into the next
    # block's first decode call.
    supports_logit_positions = True
    supports_commit_and_decode = True
    # A prompt of several blocks goes into an empty cache in one block-causal forward
    # (False: block by block, one forward each; the prefill benchmark compares the two).
    prefill_in_one_pass = True
    logit_shift = False

    def _init_training_attention(self) -> None:
        # The training forward's attention: None reads DID_ENGINE_TRAIN_ATTENTION (default
        # auto: compiled FlexAttention on CUDA, dense-mask SDPA elsewhere); or one of
        # TRAINING_ATTENTION_CHOICES. last_training_attention names the path the last
        # training forward took: sdpa-dense, flex-compiled or flex-eager.
        self.training_attention: str | None = None
        self.last_training_attention: str | None = None

    @property
    def mask_id(self) -> int:
        return self.config.mask_id

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device  # the token embedding, registered first

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _conditioning(self, batch_size: int, sigma, device):
        """The conditioning vector the output layer takes ([B, c]), or None (the default: a
        model without time conditioning)."""
        return None

    # -- the output side ----------------------------------------------------------------

    def _head(self, hidden, cond, logit_positions=None):
        """Logits [B, S, V] of hidden [B, S, d] as they are (no shift), or [M, V] at the M
        true positions of logit_positions [B, S] (row-major)."""
        if logit_positions is not None:
            # The output layer is a large share of a forward with a big vocabulary: run it
            # only where logits are wanted (the masked positions, when sampling).
            if logit_positions.shape != hidden.shape[:2] or logit_positions.dtype != torch.bool:
                raise ValueError(f"logit_positions must be a bool tensor of the tokens' shape "
                                 f"{tuple(hidden.shape[:2])}")
            if cond is not None:
                cond = cond[logit_positions.nonzero()[:, 0]]  # [M, c]
            hidden = hidden[logit_positions]  # [M, d]
        return self._output(hidden, cond)

    def _logits(self, hidden, cond, logit_positions=None, before=None):
        """As _head, aligned to the positions predicted: with logit_shift, position i takes
        the hidden state of i - 1 and position 0 that of ``before`` [B, d] (the position
        preceding the chunk; None or zeros: none, zero logits)."""
        if self.logit_shift:
            B, _, d = hidden.shape
            first = hidden.new_zeros(B, 1, d) if before is None else before[:, None].to(hidden.dtype)
            hidden = torch.cat([first, hidden[:, :-1]], dim=1)
        return self._head(hidden, cond, logit_positions)

    def _last_hidden(self, cache):
        """The cache's hidden state of the last committed position ([B, d]; None for a model
        without logit shift)."""
        if not self.logit_shift:
            return None
        if not isinstance(cache, LastHiddenKVCache):
            raise ValueError("a logit-shift model needs the cache from its new_kv_cache (a LastHiddenKVCache)")
        return cache.last_hidden

    def _remember_last(self, cache, hidden) -> None:
        """After a commit of hidden [B, n, d]: keep its last position for the next block."""
        if self.logit_shift:
            self._last_hidden(cache).copy_(hidden[:, -1])

    # -- argument checks -----------------------------------------------------------------

    def _check_tokens(self, tokens, name="tokens"):
        if not torch.is_tensor(tokens) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an int64 tensor [B, S], got "
                             f"{tuple(tokens.shape) if torch.is_tensor(tokens) else type(tokens).__name__}")

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

    def _check_block(self, block_tokens, cache: BlockKVCache):
        self._check_tokens(block_tokens, "block_tokens")
        if block_tokens.shape[0] != cache.batch_size:
            raise ValueError(f"block_tokens has batch {block_tokens.shape[0]} but the cache has {cache.batch_size}")

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

    # -- forwards ------------------------------------------------------------------------

    def forward(self, tokens, x0=None, block_size: int | None = None, sigma=None, logit_positions=None):
        """Logits [B, L, V] aligned to the positions they predict ([M, V] at the true
        positions of logit_positions, when given; not for the training forward).

        - ``model(x_t, x0=x_0, block_size=b)``: training forward over cat(x_t, x_0) under
          the block diffusion mask (dense-mask SDPA on a CPU, compiled FlexAttention on
          CUDA: see ``training_attention``); logits of the x_t half. With b >= L the x_0 half
          would be unused, so it is skipped (a global forward on x_t).
        - ``model(tokens, block_size=b)``: block-causal, no cache.
        - ``model(tokens)``: global bidirectional.
        """
        self._check_forward_args(tokens, x0, block_size, logit_positions)
        L = tokens.shape[1]
        if x0 is not None and block_size < L:
            return self._training_forward(tokens, x0, block_size, sigma)
        cos, sin = self.rotary_emb.cos_sin(torch.arange(L, device=tokens.device))
        if block_size is None or block_size >= L:
            def attend(q, k, v):
                return sdpa(*_rotate(q, k, cos, sin), v)
        elif torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # Differentiable path (the op is forward-only): SDPA with a dense mask.
            mask = block_causal_mask(L, block_size, device=tokens.device)  # [L, L]

            def attend(q, k, v):
                return sdpa(*_rotate(q, k, cos, sin), v, mask)
        else:
            def attend(q, k, v):
                return ops.block_causal_attention(*_rotate(q, k, cos, sin), v, block_size)
        return self._logits(*self._trunk(tokens, sigma, lambda i: attend), logit_positions)

    def _training_forward(self, x_t, x0, block_size, sigma):
        B, L = x_t.shape
        cos, sin = self.rotary_emb.cos_sin(torch.arange(L, device=x_t.device).repeat(2))  # both halves: 0..L-1
        path = resolve_training_attention(self.training_attention, x_t.device)

        def attend(q, k, v):  # [B, 2L, H or H_kv, D]
            out, self.last_training_attention = block_diffusion_attention(*_rotate(q, k, cos, sin), v, L, block_size,
                                                                          path)
            return out

        hidden, cond = self._trunk(torch.cat([x_t, x0], dim=1), sigma, lambda i: attend)  # [B, 2L, d]
        if not self.logit_shift:
            return self._head(hidden[:, :L], cond)
        # Token i is predicted from position i - 1: in the x_0 stream when i starts a block
        # (an x_t block does not see the x_t block before it), in the x_t stream otherwise.
        # Index 0 of `padded` is a zero row: position 0 has no predecessor (zero logits).
        i = torch.arange(L, device=x_t.device)
        source = torch.where(i % block_size == 0, L + i, i)  # = (index of position i - 1) + 1 in padded
        source[0] = 0
        padded = torch.cat([hidden.new_zeros(B, 1, hidden.shape[-1]), hidden], dim=1)
        return self._head(padded[:, source], cond)

    # -- KV-cached sampling --------------------------------------------------------------

    def decode(self, block_tokens, cache: BlockKVCache, sigma=None, logit_positions=None):
        """Logits [B, n, V] of the active block against the cache ([M, V] at the true
        positions of logit_positions [B, n], when given); the cache is unchanged. Queries
        are computed for the n block tokens only; cached keys are used as stored. With
        logit shift, row 0 comes from the cached last committed position."""
        self._check_block(block_tokens, cache)
        n = block_tokens.shape[1]
        if n > cache.capacity:
            raise ValueError(f"a block of {n} tokens exceeds the cache capacity {cache.capacity}")
        before = self._last_hidden(cache)
        if before is not None and n == 1:
            # With logit shift a one-token block is predicted from the last committed position
            # alone, and its own forward would feed nothing else: run none (block-1 / AR
            # decoding then costs one output layer here and one row in the commit).
            cond = self._conditioning(block_tokens.shape[0], sigma, block_tokens.device)
            return self._head(before[:, None].to(self.dtype), cond, logit_positions)
        cos, sin = self.rotary_emb.cos_sin(cache.positions(n))  # [B, n, 1, D/2]

        def attend_for_layer(i):
            def attend(q, k, v):
                q, k = _rotate(q, k, cos, sin)
                return ops.block_decode_attention(q, cache.k[i], cache.v[i], k, v, cache.lengths)
            return attend

        return self._logits(*self._trunk(block_tokens, sigma, attend_for_layer), logit_positions, before)

    @torch.no_grad()
    def commit(self, block_tokens, cache: BlockKVCache, sigma=None, block_size: int | None = None) -> int:
        """Append a finished block's K/V to the cache (one forward over the clean block), and
        with logit shift its last position's hidden state.

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
                    q, k = _rotate(q, k, cos, sin)
                    out = ops.block_decode_attention(q, cache.k[i], cache.v[i], k, v, cache.layer_lengths(i))
                    cache.commit_layer(i, k, v)
                    return out
                return attend

            self._remember_last(cache, self._trunk(chunk, sigma, attend_for_layer)[0])
        return -(-n // step)

    def _prefill(self, tokens, cache: BlockKVCache, sigma, block_size: int) -> None:
        """One forward over a prompt [B, P] into an empty cache: block-causal attention, then
        each layer's K/V (after rotary) committed at once."""
        cache.make_room(tokens.shape[1], block_size=self.config.block_size)
        cos, sin = self.rotary_emb.cos_sin(cache.positions(tokens.shape[1]))  # [B, P, 1, D/2]

        def attend_for_layer(i):
            def attend(q, k, v):  # [B, P, H or H_kv, D]
                q, k = _rotate(q, k, cos, sin)
                out = ops.block_causal_attention(q, k, v, block_size)
                cache.commit_layer(i, k, v)
                return out
            return attend

        self._remember_last(cache, self._trunk(tokens, sigma, attend_for_layer)[0])

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
        if self.logit_shift and n2 == 1:
            # The one-token block's logits come from the clean block's last position (see
            # decode): the commit's forward of n1 rows is all that is needed.
            self.commit(clean_tokens, cache, sigma)
            return self.decode(block_tokens, cache, sigma, logit_positions)
        before = self._last_hidden(cache)
        cache.make_room(n1, block_size=self.config.block_size)
        if n2 > cache.capacity:
            raise ValueError(f"a block of {n2} tokens exceeds the cache capacity {cache.capacity}")
        cos, sin = self.rotary_emb.cos_sin(cache.positions(n1 + n2))  # [B, n1 + n2, 1, D/2]

        def attend_for_layer(i):
            def attend(q, k, v):
                q, k = _rotate(q, k, cos, sin)  # [B, n1 + n2, H or H_kv, D]
                lengths = cache.layer_lengths(i)
                clean = ops.block_decode_attention(q[:, :n1], cache.k[i], cache.v[i], k[:, :n1], v[:, :n1], lengths)
                cache.commit_layer(i, k[:, :n1], v[:, :n1])  # advances lengths by n1
                block = ops.block_decode_attention(q[:, n1:], cache.k[i], cache.v[i], k[:, n1:], v[:, n1:], lengths)
                return torch.cat([clean, block], dim=1)
            return attend

        B = block_tokens.shape[0]
        hidden, cond = self._trunk(torch.cat([clean_tokens, block_tokens], dim=1), sigma, attend_for_layer)
        wanted = torch.ones_like(block_tokens, dtype=torch.bool) if logit_positions is None else logit_positions
        need = torch.cat([torch.zeros(B, n1, dtype=torch.bool, device=wanted.device), wanted], dim=1)
        logits = self._logits(hidden, cond, need, before)  # a shift reaches across into the clean block
        self._remember_last(cache, hidden[:, :n1])
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
          (the approximation that makes a refine step cost r / L of a full one). With
          logit shift the logits at p come from position p - 1, so the predecessors p - 1
          are re-run too, as queries that write nothing (2r rows).

        Returns logits [B, S, V] (S = L or r), or [M, V] at logit_positions ([B, S] bool).
        """
        self._check_refine_args(tokens, context, positions, write)
        B, L = tokens.shape
        if positions is None:
            rows, where, keep = tokens, torch.arange(L, device=tokens.device)[None], None  # [1, L]: every row's
        else:
            r = positions.shape[1]
            if r == 0:  # nothing to re-run
                V = self.config.vocab_size
                return tokens.new_zeros((0, V) if logit_positions is not None else (B, 0, V), dtype=self.dtype)
            keep = slice(None) if write is None else write
            where = positions
            if self.logit_shift:
                keep = torch.ones_like(positions, dtype=torch.bool) if write is None else write
                where = torch.cat([positions, (positions - 1).clamp(min=0)], dim=1)  # [B, 2r]
                keep = torch.cat([keep, torch.zeros_like(keep)], dim=1)
            rows = tokens.gather(1, where)
        cos, sin = self.rotary_emb.cos_sin(where)  # [B or 1, S, 1, D/2]
        batch_index = None if positions is None else torch.arange(B, device=tokens.device)[:, None].expand_as(where)

        def attend_for_layer(i):
            def attend(q, k, v):
                q, k = _rotate(q, k, cos, sin)  # [B, S, H or H_kv, D]
                if positions is None:
                    context.k[i, :, :L], context.v[i, :, :L] = k, v
                    return sdpa(q, k, v)
                context.k[i][batch_index[keep], where[keep]] = k[keep]
                context.v[i][batch_index[keep], where[keep]] = v[keep]
                return sdpa(q, context.k[i, :, :L], context.v[i, :, :L])
            return attend

        hidden, cond = self._trunk(rows, sigma, attend_for_layer)
        if positions is None:
            context.set_lengths(L)
            return self._logits(hidden, cond, logit_positions)
        if self.logit_shift:  # the predecessors' hidden states; position 0 has none (zero logits)
            hidden = torch.where((positions > 0)[..., None], hidden[:, r:], 0.0)
        return self._head(hidden, cond, logit_positions)

    # -- checkpoints ---------------------------------------------------------------------

    def save_pretrained(self, path) -> None:
        """Write config.json + model.safetensors into directory `path` (atomically, no pickle)."""
        checkpoint.save_pretrained(self, path)
