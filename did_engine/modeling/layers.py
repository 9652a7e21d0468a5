"""Layers shared by model families: norms, embeddings, rotary, attention and its masks.

A model file (dit.py; a second family beside it) builds its blocks from these:

    LayerNorm, TokenEmbedding, TimestepEmbedder, modulate    norms, embeddings, adaLN
    Rotary, apply_rotary                                     rotary positions (split half)
    block_causal_mask, block_diffusion_mask(_mod)            the attention masks
    sdpa                                                     differentiable attention
    resolve_training_attention, block_diffusion_attention    the training forward's attention

Attention tensors are [B, S, H, D] (batch, sequence, heads, head dim).
"""

from __future__ import annotations

import functools
import math
import os
import types
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from did_engine.errors import UserError

# ---------------------------------------------------------------------------------------
# Norms and embeddings


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, always computed in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.layer_norm(_at_least_float32(x), [self.dim]) * _at_least_float32(self.weight)
        # Back to the parameters' dtype so bf16 models run without autocast (a no-op in fp32).
        return x.to(self.weight.dtype)


def _at_least_float32(x):
    """Low-precision tensors go to float32; float32 and float64 stay as they are."""
    return x if x.dtype == torch.float64 else x.float()


def modulate(x, shift, scale):
    """adaLN: x [B, S, dim], shift/scale [B, 1, dim]."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the noise level, then a 2-layer MLP (as in DiT)."""

    def __init__(self, cond_dim: int, n_frequencies: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_frequencies, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.n_frequencies = n_frequencies

    def forward(self, sigma):  # [B] -> [B, cond_dim]
        half = self.n_frequencies // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        angles = sigma[:, None].float() * freqs[None]  # [B, half]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class TokenEmbedding(nn.Module):
    """Token ids [B, S] -> vectors [B, S, dim]; the parameter is ``embedding`` [V, dim]
    (BD3-LM's name, so its checkpoints load as they are)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, tokens):
        # F.embedding, not self.embedding[tokens]: the backward of advanced indexing is an
        # accumulating index_put whose threads add into shared rows with atomics, so a
        # token repeated in a batch gets its gradient summed in a different order from run
        # to run. The CPU backward of F.embedding (embedding_dense_backward_cpu) instead
        # splits the vocabulary into row ranges, one range per thread, and each thread walks
        # all the tokens in order, adding only those in its range: every row's sum is taken
        # in token order, whatever the thread count, so it is bit-reproducible.
        return F.embedding(tokens, self.embedding)


# ---------------------------------------------------------------------------------------
# Rotary positions


class Rotary(nn.Module):
    """Rotary position embedding, split-half convention: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq)  # [D/2], saved: BD3-LM checkpoints carry it

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not round the frequencies: keep them >= float32 on any device.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(device=self.inv_freq.device, dtype=_at_least_float32(self.inv_freq).dtype)
        return self

    def cos_sin(self, positions):
        """positions [S] or [B, S] (int) -> cos, sin [1 or B, S, 1, D/2] in float32."""
        if positions.dim() == 1:
            positions = positions[None]
        angles = positions.to(self.inv_freq.dtype)[..., None] * self.inv_freq  # [B, S, D/2]
        return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x, cos, sin):
    """x [B, S, H, D]; cos/sin [B or 1, S, 1, D/2]. Computed in >= float32, returned in x's dtype."""
    half = x.shape[-1] // 2
    xf = _at_least_float32(x)
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# ---------------------------------------------------------------------------------------
# Attention and its masks


def sdpa(q, k, v, mask=None):
    """q [B, S, H, D], k/v [B, T, H_kv, D] (any strides; H_kv divides H: grouped-query
    heads) -> [B, S, H, D], PyTorch SDPA (differentiable)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def block_causal_mask(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """[S, S] bool (True = attend): query i sees key j when block(j) <= block(i), the
    attention of a prompt prefill and of the x_0 half of the training mask below."""
    blocks = torch.arange(seq_len, device=device) // block_size  # [S]
    return blocks[None, :] <= blocks[:, None]


def _block_diffusion_rule(q_idx, kv_idx, seq_len: int, block_size: int):
    """May query q_idx attend to key kv_idx over cat(x_t, x_0)? Index tensors broadcast.

    The one definition of the training mask: the dense mask (CPU path) evaluates it on a
    [2L, 2L] grid, the FlexAttention mask_mod (CUDA path) on single index pairs.
    """
    q_x0, kv_x0 = q_idx >= seq_len, kv_idx >= seq_len
    q_block = torch.where(q_x0, q_idx - seq_len, q_idx) // block_size
    kv_block = torch.where(kv_x0, kv_idx - seq_len, kv_idx) // block_size
    diagonal = (q_block == kv_block) & (q_x0 == kv_x0)
    offset_causal = (q_block > kv_block) & kv_x0 & ~q_x0
    causal = (q_block >= kv_block) & kv_x0 & q_x0
    return diagonal | offset_causal | causal


def block_diffusion_mask(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """The training mask over cat(x_t, x_0), [2L, 2L] bool (True = attend).

    With L = 4 and block 2 (t = x_t token, 0 = x_0 token; rows are queries)::

                 x_t     x_0
               t t t t 0 0 0 0
        x_t  t x x . . . . . .    block diagonal: x_t block b sees x_t block b
             t x x . . . . . .
             t . . x x x x . .    offset block-causal: x_t block b sees x_0 blocks < b
             t . . x x x x . .
        x_0  0 . . . . x x . .    block-causal: x_0 block b sees x_0 blocks <= b
             0 . . . . x x . .
             0 . . . . x x x x
             0 . . . . x x x x

    A last block shorter than block_size (L not a multiple of it) is a block of its own.
    """
    idx = torch.arange(2 * seq_len, device=device)
    return _block_diffusion_rule(idx[:, None], idx[None, :], seq_len, block_size)


def block_diffusion_mask_mod(seq_len: int, block_size: int):
    """The training mask as a FlexAttention ``mask_mod(batch, head, q_idx, kv_idx)``."""

    def mask_mod(batch, head, q_idx, kv_idx):
        return _block_diffusion_rule(q_idx, kv_idx, seq_len, block_size)

    return mask_mod


# ---------------------------------------------------------------------------------------
# Training attention on a GPU: compiled FlexAttention with a block mask
#
# The dense [2L, 2L] mask makes SDPA compute every score and throw three quarters away
# (and, with a boolean mask, leaves the flash kernels unusable). FlexAttention skips the
# fully masked 128 x 128 tiles, as BD3-LM does. On a CPU, SDPA with the dense mask stays
# the path: compiling FlexAttention there takes minutes and buys nothing measured.

TRAINING_ATTENTION_ENV = "DID_ENGINE_TRAIN_ATTENTION"
# auto: flex on CUDA, sdpa elsewhere. flex-eager: FlexAttention without compilation
# (slow: materialises the scores; for tests and debugging).
TRAINING_ATTENTION_CHOICES = ("auto", "sdpa", "flex", "flex-eager")


def resolve_training_attention(choice: str | None, device) -> str:
    """The training forward's attention path on ``device`` for ``choice`` (None: the
    environment variable DID_ENGINE_TRAIN_ATTENTION, default auto): sdpa, flex or flex-eager."""
    source = "model.training_attention"
    if choice is None:
        choice, source = os.environ.get(TRAINING_ATTENTION_ENV, "auto") or "auto", TRAINING_ATTENTION_ENV
    if choice not in TRAINING_ATTENTION_CHOICES:
        raise UserError(f"{source} = {choice!r}: must be one of {', '.join(TRAINING_ATTENTION_CHOICES)}")
    if choice == "auto":
        return "flex" if torch.device(device).type == "cuda" else "sdpa"
    return choice


class FlexTrainingAttention:
    """FlexAttention over cat(x_t, x_0) with the block diffusion BlockMask.

    Block masks are cached per (L, block_size, device). Compiled functions are cached per
    shape set (batch, heads, 2L, head dim, dtype, device, block size, grad mode), one
    ``torch.compile(..., dynamic=False, fullgraph=True)`` each, over its own copy of the
    code object: dynamo keeps its compiled entries per code object, so one shared function
    would pile every shape onto one entry list and, past ``recompile_limit`` (8), quietly
    run FlexAttention eagerly. Here each function compiles exactly once. A compilation that
    fails is never hidden: it warns (RuntimeWarning), runs eager FlexAttention for that
    shape set, and ``last_path`` says "flex-eager" instead of "flex-compiled".
    """

    def __init__(self, compile_fn=None):
        self._compile = compile_fn or _compile_flex_function
        self.block_masks: dict = {}
        self.compiled: dict = {}  # shape key -> (function, path label)
        self.last_path: str | None = None

    def block_mask(self, seq_len: int, block_size: int, device):
        key = (seq_len, block_size, str(device))
        if key not in self.block_masks:
            self.block_masks[key] = create_block_mask(block_diffusion_mask_mod(seq_len, block_size), B=None, H=None,
                                                      Q_LEN=2 * seq_len, KV_LEN=2 * seq_len, device=device)
        return self.block_masks[key]

    def __call__(self, q, k, v, seq_len: int, block_size: int, compiled: bool = True):
        """q/k/v [B, 2L, H, D] -> [B, 2L, H, D]."""
        block_mask = self.block_mask(seq_len, block_size, q.device)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, 2L, D]
        if not compiled:
            self.last_path = "flex-eager"
            return flex_attention(q, k, v, block_mask=block_mask).transpose(1, 2)
        key = (*q.shape, q.dtype, str(q.device), block_size, torch.is_grad_enabled())
        entry = self.compiled.get(key)
        if entry is None:
            fn = self._compile(len(self.compiled))
            try:
                out = fn(q, k, v, block_mask)  # compiles now (torch.compile is lazy)
                self.compiled[key] = (fn, "flex-compiled")
            except Exception as exc:  # noqa: BLE001 - any compiler failure; real bugs fail eagerly below too
                warnings.warn(f"FlexAttention could not be compiled for the training forward (shapes {key}): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                              f"Running it EAGERLY for these shapes: it materialises the [2L, 2L] scores and is "
                              f"much slower. Set {TRAINING_ATTENTION_ENV}=sdpa to use the dense-mask path instead.",
                              RuntimeWarning, stacklevel=3)
                self.compiled[key] = (_eager_flex_function, "flex-eager")
                out = _eager_flex_function(q, k, v, block_mask)
            self.last_path = self.compiled[key][1]
            return out.transpose(1, 2)
        fn, self.last_path = entry
        return fn(q, k, v, block_mask).transpose(1, 2)


def _eager_flex_function(q, k, v, block_mask):
    return flex_attention(q, k, v, block_mask=block_mask)


def _compile_flex_function(index: int):
    """torch.compile of FlexAttention over a fresh copy of the code object (see
    FlexTrainingAttention for why), static shapes, whole graph or an error."""
    code = _eager_flex_function.__code__.replace(co_name=f"flex_training_attention_{index}")
    fn = types.FunctionType(code, _eager_flex_function.__globals__, code.co_name)
    return torch.compile(fn, dynamic=False, fullgraph=True)


# One per process: compiled functions and block masks depend on shapes, not on weights.
FLEX_TRAINING_ATTENTION = FlexTrainingAttention()


@functools.lru_cache(maxsize=8)
def _dense_block_diffusion_mask(seq_len: int, block_size: int, device: str) -> torch.Tensor:
    return block_diffusion_mask(seq_len, block_size, device=device)  # [2L, 2L]: built once per shape


def block_diffusion_attention(q, k, v, seq_len: int, block_size: int, path: str):
    """The training forward's attention over cat(x_t, x_0) under the block diffusion mask,
    by ``path`` (from resolve_training_attention): q [B, 2L, H, D], k/v [B, 2L, H_kv, D],
    after rotary -> ([B, 2L, H, D], the path taken: "sdpa-dense", "flex-compiled" or "flex-eager")."""
    if path == "sdpa":
        return sdpa(q, k, v, _dense_block_diffusion_mask(seq_len, block_size, str(q.device))), "sdpa-dense"
    group = q.shape[2] // k.shape[2]
    if group > 1:  # the FlexAttention path takes one K/V head per query head
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    out = FLEX_TRAINING_ATTENTION(q, k, v, seq_len, block_size, compiled=path == "flex")
    return out, FLEX_TRAINING_ATTENTION.last_path
