"""BlockDiffusionLM: a DiT-style transformer for block diffusion, compatible with BD3-LM.

Read top to bottom: configuration, the building blocks (LayerNorm, timestep embedding,
rotary), one transformer block, then the model with its four ways to run:

    model(x_t, x0=x_0, block_size=b)   training: cat(x_t, x_0) under the block diffusion mask
    model(tokens, block_size=b)        block-causal, no cache
    model(tokens)                      global bidirectional
    model.decode(block, cache)         the active block against a KV cache (sampling)
    model.commit(block, cache)         append a finished block's K/V to the cache

All return raw logits (no SUBS parameterisation: see did_engine.diffusion.subs_log_probs).
Parameter names equal BD3-LM's backbone names, so BD3-LM checkpoints load directly.
"""

from __future__ import annotations

import math
import os
import types
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from did_engine import ops
from did_engine.errors import UserError
from did_engine.kv_cache import BlockKVCache


@dataclass
class ModelConfig:
    """Architecture of a BlockDiffusionLM. Field names follow BD3-LM's config.json."""

    vocab_size: int = 50258  # GPT-2's 50257 tokens + the mask token (the last id)
    model_length: int = 1024  # L: the context the model was trained on
    hidden_dim: int = 768
    cond_dim: int = 128
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1
    block_size: int = 4  # default block size for sampling
    adaln: bool = True  # adaLN modulation from the timestep embedding
    time_conditioning: bool = False  # False: sigma is zeroed before the timestep embedder
    cross_attn: bool = True  # vectorised cat(x_t, x_0) training (BD3-LM); False = MDLM-style
    rotary_base: float = 10000.0
    extra: dict = field(default_factory=dict)  # metadata carried through checkpoints

    def __post_init__(self):
        check_model_config(self)
        # A config file may say 0 for 0.0: store floats as floats so to_dict is the same either way.
        self.dropout, self.rotary_base = float(self.dropout), float(self.rotary_base)

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, unknown: str = "extra") -> "ModelConfig":
        """Build from a dict of fields. Keys that are not fields go to ``extra`` when
        ``unknown="extra"`` (BD3-LM configs carry training settings) or are refused when
        ``unknown="error"`` (a misspelt field would otherwise silently take its default)."""
        if not isinstance(d, dict):
            raise UserError(f"a model config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        others = sorted(k for k in d if k not in known)
        if others and unknown == "error":
            raise UserError(f"unknown model config keys {', '.join(map(repr, others))}; "
                            f"the fields are {', '.join(sorted(known - {'extra'}))}")
        extra = d.get("extra", {})
        if not isinstance(extra, dict):
            raise UserError(f"model config 'extra' must be an object, got {type(extra).__name__}")
        extra = {**extra, **{k: d[k] for k in others}}
        return cls(**{k: v for k, v in d.items() if k in known and k != "extra"}, extra=extra)


# Upper bounds that no real model reaches, so that a config (from a file or the Python API)
# cannot ask for an absurd allocation before anything is built.
MAX_VOCAB_SIZE = 1 << 22  # 4M tokens (real vocabularies: 30k-260k)
MAX_MODEL_LENGTH = 1 << 20  # 1M positions
MAX_WIDTH = 1 << 15  # hidden_dim and cond_dim (largest published LLMs: ~16k)
MAX_BLOCKS = 1024
MAX_WEIGHT_ELEMENTS = 1 << 34  # ~17e9 weights (68 GB in float32)
MAX_ROTARY_BASE = 1e12


def estimated_weight_elements(cfg: "ModelConfig") -> int:
    """The model's weight count with adaLN (an upper bound without it), from the config alone:
    checked against the limit before anything is allocated."""
    h, c, v = cfg.hidden_dim, cfg.cond_dim, cfg.vocab_size
    per_block = 12 * h * h + 7 * h + 6 * (c + 1) * h  # qkv, out, mlp with biases; 2 norms; adaLN
    return 2 * v * h + v + cfg.n_blocks * per_block + 2 * (c + 1) * h + h + 256 * c + c * c + 2 * c


def check_model_config(cfg: "ModelConfig") -> None:
    """Check every field's type and range; raise UserError naming the field. Called by
    ModelConfig itself, so both configs from files and from the Python API are checked
    before any tensor is allocated."""

    def fail(name, what):
        raise UserError(f"model config {name} = {getattr(cfg, name)!r:.80}: {what}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_real(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for name, low, high in (("vocab_size", 2, MAX_VOCAB_SIZE), ("model_length", 1, MAX_MODEL_LENGTH),
                            ("hidden_dim", 1, MAX_WIDTH), ("cond_dim", 1, MAX_WIDTH), ("n_blocks", 1, MAX_BLOCKS),
                            ("n_heads", 1, MAX_WIDTH), ("block_size", 1, MAX_MODEL_LENGTH)):
        value = getattr(cfg, name)
        if not is_int(value):
            fail(name, f"must be an integer, not {type(value).__name__}")
        if not low <= value <= high:
            fail(name, f"must be in [{low}, {high}]")
    for name in ("adaln", "time_conditioning", "cross_attn"):
        if not isinstance(getattr(cfg, name), bool):
            fail(name, "must be true or false")
    if not is_real(cfg.dropout) or not 0.0 <= cfg.dropout < 1.0:
        fail("dropout", "must be a number in [0, 1)")
    if not is_real(cfg.rotary_base) or not 1.0 < cfg.rotary_base <= MAX_ROTARY_BASE:
        fail("rotary_base", f"must be a finite number in (1, {MAX_ROTARY_BASE:g}]")
    if cfg.hidden_dim % cfg.n_heads:
        fail("n_heads", f"must divide hidden_dim {cfg.hidden_dim}")
    if (cfg.hidden_dim // cfg.n_heads) % 2:
        fail("n_heads", f"gives head_dim {cfg.hidden_dim // cfg.n_heads}; rotary embeddings need an even head_dim")
    if cfg.block_size > cfg.model_length:
        fail("block_size", f"must not exceed model_length {cfg.model_length}")
    if not isinstance(cfg.extra, dict) or not all(isinstance(k, str) for k in cfg.extra):
        fail("extra", "must be a dict with string keys")
    if estimated_weight_elements(cfg) > MAX_WEIGHT_ELEMENTS:
        raise UserError(f"model config asks for about {estimated_weight_elements(cfg):.3g} weights "
                        f"(vocab_size {cfg.vocab_size}, hidden_dim {cfg.hidden_dim}, n_blocks {cfg.n_blocks}); "
                        f"the limit is {MAX_WEIGHT_ELEMENTS:.3g}")


PRESETS = {
    # For tests: runs in milliseconds on a CPU.
    "tiny": dict(vocab_size=67, model_length=32, hidden_dim=64, cond_dim=32, n_blocks=2, n_heads=4, dropout=0.0),
    # Sized for a CPU: the embedded default model (a BPE vocabulary trained on the corpus,
    # L = 256, ~6M parameters) trains in about two hours on 2 cores.
    "mini": dict(vocab_size=4097, model_length=256, hidden_dim=256, cond_dim=128, n_blocks=6, n_heads=4, dropout=0.0),
    # BD3-LM "small" (OpenWebText, L = 1024): ~170M parameters with its untied 50258-token embeddings.
    "small": dict(vocab_size=50258, model_length=1024, hidden_dim=768, cond_dim=128, n_blocks=12, n_heads=12),
}


# ---------------------------------------------------------------------------------------
# Building blocks


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
_FLEX_TRAINING_ATTENTION = FlexTrainingAttention()


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
# The model


def _sdpa(q, k, v, mask=None):
    """q/k/v [B, S, H, D] (any strides) -> [B, S, H, D], PyTorch SDPA (differentiable)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


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
        self._mask_cache: dict = {}
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

    def _training_mask(self, seq_len: int, block_size: int, device):
        key = (seq_len, block_size, str(device))
        if key not in self._mask_cache:
            self._mask_cache[key] = block_diffusion_mask(seq_len, block_size, device=device)
        return self._mask_cache[key]

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
                return _sdpa(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
        elif torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # Differentiable path (the op is forward-only): SDPA with a dense mask.
            mask = ops.reference.block_causal_mask(L, block_size, device=tokens.device)

            def attend(q, k, v):
                return _sdpa(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, mask)
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
        if path == "sdpa":
            mask = self._training_mask(L, block_size, x_t.device)  # [2L, 2L]
            self.last_training_attention = "sdpa-dense"

            def attend(q, k, v):
                return _sdpa(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, mask)
        else:
            flex = _FLEX_TRAINING_ATTENTION

            def attend(q, k, v):
                out = flex(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, L, block_size,
                           compiled=path == "flex")
                self.last_training_attention = flex.last_path
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
                                                     cache._layer_lengths[i])
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
                lengths = cache._layer_lengths[i]
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
                    return _sdpa(q, k, v)
                keep = slice(None) if write is None else write
                context.k[i][batch_index[keep], where[keep]] = k[keep]
                context.v[i][batch_index[keep], where[keep]] = v[keep]
                return _sdpa(q, context.k[i, :, :L], context.v[i, :, :L])
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
        from did_engine.checkpoint import load_pretrained

        return load_pretrained(cls, path, device=device, dtype=dtype, strict=strict)

    def save_pretrained(self, path) -> None:
        """Write config.json + model.safetensors into directory `path` (atomically, no pickle)."""
        from did_engine.checkpoint import save_pretrained

        save_pretrained(self, path)
