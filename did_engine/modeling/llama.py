"""LlamaBlockDiffusionLM: block diffusion over Llama / Qwen2 / Qwen3 transformer blocks.

The architecture of the block diffusion LMs people download (SDAR and TraDo: Qwen3 layout;
Fast-dLLM v2: Qwen2.5 layout) and of the causal LMs they are adapted from: RMSNorm, SwiGLU,
rotary positions (``rope_theta``, absolute positions from 0), grouped-query attention, q/k/v
bias (Qwen2), per-head q/k RMSNorm (Qwen3), tied or untied embeddings. Parameter names are
Hugging Face's (``model.layers.0.self_attn.q_proj.weight``, ...), so HF safetensors load as
they are. The surface is BlockDiffusionLM's (see did_engine.modeling), so DiDSampler, training
and evaluation need no special cases::

    model(x_t, x0=x_0, block_size=b)   training: cat(x_t, x_0) under the block diffusion mask
    model(tokens, block_size=b)        block-causal, no cache (b = 1: the causal LM)
    model(tokens)                      global bidirectional
    model.decode(block, cache)         the active block against a KV cache
    model.commit(block, cache)         append a finished block's K/V to the cache
    model.commit_and_decode / refine_forward / new_kv_cache / save_pretrained / from_pretrained

No timestep conditioning: ``sigma`` is accepted and ignored (as in SDAR).

**Logit shift.** SDAR/TraDo predict token i from position i (``logit_shift`` false).
Fast-dLLM v2 and models adapted from a causal LM predict token i from position i - 1
(``logit_shift`` true). The shift lives inside the model: every forward and ``decode``
return logits aligned to the positions they predict. In ``decode``, row 0 of a block comes
from the last committed position, whose final hidden state the cache keeps
(:class:`LastHiddenKVCache`, written by every commit). In the training forward the first
token of an x_t block is predicted from the x_0 stream's previous position (the clean
prefix), the others from the x_t stream. **Position 0 has no predecessor**: a shift model
returns all-zero logits there (a uniform prediction); start its sequences with a prompt or
a BOS token (the sampler never redraws prompt tokens).

**Checkpoints** (``did_engine.load_model(name)`` or ``LlamaBlockDiffusionLM.from_pretrained``:
a local directory, a Hugging Face hub name, or a ``.gguf`` file; see did_engine.modeling.hf_checkpoints)::

    model_type        layout          shift  mask id                              block size
    sdar              Qwen3 (q/k norm) no    <|MASK|> from the tokenizer (151669)  config block_size, else 4
    Fast_dLLM_Qwen    Qwen2 (q/k/v bias) yes |<MASK>| from the tokenizer (151665)  bd_size (32)
    llama/qwen2/qwen3 causal LM       yes    a new embedding row (id = old vocab size, initialised
                                             at the embedding mean; SUBS never predicts it)
    *.gguf            read by transformers' GGUF loader, then as its model_type
    did_engine        save_pretrained's own format (safetensors + JSON)

A ``mask_id`` argument overrides the config and tokenizer (no row is added then). Refused by
name: rope scaling other than the default, sliding-window attention, mixture of experts,
activations other than SiLU, partial rotary. Weights are read from safetensors only.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from did_engine.errors import UserError
from did_engine.modeling.base import BlockDiffusionBase, LastHiddenKVCache
from did_engine.modeling.kv_cache import BlockKVCache
from did_engine.modeling.config import (
    MAX_BLOCKS,
    MAX_MODEL_LENGTH,
    MAX_ROTARY_BASE,
    MAX_VOCAB_SIZE,
    MAX_WEIGHT_ELEMENTS,
    MAX_WIDTH,
    ModelConfig,
)
from did_engine.modeling.layers import _at_least_float32

__all__ = ["LlamaBlockConfig", "LlamaBlockDiffusionLM", "LastHiddenKVCache"]


@dataclass
class LlamaBlockConfig:
    """Architecture and diffusion settings of a LlamaBlockDiffusionLM. Architecture fields
    keep Hugging Face's names; ``model_length`` is HF's ``max_position_embeddings``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    mask_id: int
    num_key_value_heads: int | None = None  # None: num_attention_heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    model_length: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2: q/k/v projections have a bias
    o_bias: bool = False  # Llama/Qwen3 attention_bias: the output projection has one too
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k before the rotary
    tie_word_embeddings: bool = False
    logit_shift: bool = False  # True: the logits at position i - 1 predict token i
    block_size: int = 4  # default block size for sampling
    extra: dict = field(default_factory=dict)  # metadata carried through checkpoints

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _is_int(self.hidden_size) and _is_int(self.num_attention_heads) \
                and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_llama_config(self)
        self.rope_theta, self.rms_norm_eps = float(self.rope_theta), float(self.rms_norm_eps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, unknown: str = "error") -> "LlamaBlockConfig":
        """Build from a dict of fields, as ModelConfig.from_dict: keys that are not fields are
        refused (``unknown="error"``: a misspelt field would silently take its default) or
        kept in ``extra``; fields without a default must be there."""
        missing = sorted(f.name for f in fields(cls)
                         if f.default is MISSING and f.default_factory is MISSING and f.name not in d)
        if isinstance(d, dict) and missing:
            raise UserError(f"model config lacks {', '.join(missing)}")
        return ModelConfig.from_dict.__func__(cls, d, unknown)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def estimated_weight_elements(cfg: LlamaBlockConfig) -> int:
    """The model's weight count from the config alone (checked before anything is allocated)."""
    h, q, kv, i = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.intermediate_size
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h + (q + 2 * kv) * cfg.qkv_bias + h * cfg.o_bias \
        + (2 * i + h) * cfg.mlp_bias + 2 * cfg.head_dim * cfg.qk_norm
    return cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + cfg.num_hidden_layers * per_layer + h


def check_llama_config(cfg: LlamaBlockConfig) -> None:
    """Check every field's type and range; raise UserError naming the field."""

    def fail(name, what):
        raise UserError(f"model config {name} = {getattr(cfg, name)!r:.80}: {what}")

    for name, low, high in (("vocab_size", 2, MAX_VOCAB_SIZE), ("hidden_size", 1, MAX_WIDTH),
                            ("intermediate_size", 1, 4 * MAX_WIDTH), ("num_hidden_layers", 1, MAX_BLOCKS),
                            ("num_attention_heads", 1, MAX_WIDTH), ("num_key_value_heads", 1, MAX_WIDTH),
                            ("head_dim", 2, MAX_WIDTH), ("model_length", 1, MAX_MODEL_LENGTH),
                            ("block_size", 1, MAX_MODEL_LENGTH), ("mask_id", 0, MAX_VOCAB_SIZE)):
        value = getattr(cfg, name)
        if not _is_int(value):
            fail(name, f"must be an integer, not {type(value).__name__}")
        if not low <= value <= high:
            fail(name, f"must be in [{low}, {high}]")
    for name in ("qkv_bias", "o_bias", "mlp_bias", "qk_norm", "tie_word_embeddings", "logit_shift"):
        if not isinstance(getattr(cfg, name), bool):
            fail(name, "must be true or false")
    for name, low, high in (("rope_theta", 1.0, MAX_ROTARY_BASE), ("rms_norm_eps", 0.0, 1.0)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
            fail(name, f"must be a finite number in ({low}, {high:g}]")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        fail("num_key_value_heads", f"must divide num_attention_heads {cfg.num_attention_heads}")
    if cfg.head_dim % 2:
        fail("head_dim", "rotary embeddings need an even head_dim")
    if cfg.mask_id >= cfg.vocab_size:
        fail("mask_id", f"must be a token id below vocab_size {cfg.vocab_size}")
    if cfg.block_size > cfg.model_length:
        fail("block_size", f"must not exceed model_length {cfg.model_length}")
    if not isinstance(cfg.extra, dict) or not all(isinstance(k, str) for k in cfg.extra):
        fail("extra", "must be a dict with string keys")
    if estimated_weight_elements(cfg) > MAX_WEIGHT_ELEMENTS:
        raise UserError(f"model config asks for about {estimated_weight_elements(cfg):.3g} weights; "
                        f"the limit is {MAX_WEIGHT_ELEMENTS:.3g}")


# ---------------------------------------------------------------------------------------
# Building blocks (Hugging Face's module and parameter names)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the normalisation in >= float32 (as transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = _at_least_float32(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LlamaRotary(nn.Module):
    """Rotary position embedding, split-half convention (transformers' rotate_half; the
    DiT's apply_rotary). The frequencies are not a buffer: Hugging Face checkpoints do not
    carry them, model.to(bfloat16) must not round them, and a model built on the meta
    device needs nothing restored. They are computed once on the CPU, as transformers does,
    and copied to each device that asks."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self._inv_freq: dict = {}  # device -> float32 [D/2]

    def inv_freq(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._inv_freq:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            self._inv_freq[key] = (1.0 / (self.base ** exponents)).to(device)
        return self._inv_freq[key]

    def cos_sin(self, positions):
        """positions [S] or [B, S] (int) -> cos, sin [1 or B, S, 1, D/2] in float32."""
        if positions.dim() == 1:
            positions = positions[None]
        angles = positions.float()[..., None] * self.inv_freq(positions.device)  # [B, S, D/2]
        return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


class Attention(nn.Module):
    """q/k/v projections (grouped-query), optional q/k RMSNorm per head, and the output
    projection; the attention itself is the ``attend`` callable the model passes in."""

    def __init__(self, cfg: LlamaBlockConfig):
        super().__init__()
        h, H, Hkv, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(h, H * D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, Hkv * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, Hkv * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * D, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.heads, self.kv_heads, self.head_dim = H, Hkv, D

    def forward(self, x, attend):
        """x [B, S, hidden]; attend(q [B, S, H, D], k/v [B, S, H_kv, D]) -> [B, S, H, D] (before rotary)."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, S, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(attend(q, k, v).reshape(B, S, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaBlockConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaBlockConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, attend):
        x = x + self.self_attn(self.input_layernorm(x), attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Transformers' ``model.``: the embeddings, the layers and the final norm."""

    def __init__(self, cfg: LlamaBlockConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ---------------------------------------------------------------------------------------
# The model


class LlamaBlockDiffusionLM(BlockDiffusionBase):
    """Block diffusion LM over Llama / Qwen2 / Qwen3 blocks. See the module docstring; the
    forwards and sampling calls are BlockDiffusionBase's, over the hooks below."""

    config_class = LlamaBlockConfig
    # checkpoint.save_pretrained writes this into config.json, so loaders can tell the classes apart.
    checkpoint_class = "LlamaBlockDiffusionLM"

    def __init__(self, config: LlamaBlockConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = LlamaBlockConfig(**overrides)
        elif overrides:
            config = LlamaBlockConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        self.model = Backbone(config)
        # Tied embeddings: no lm_head module, so the state dict holds the matrix once (as HF files do).
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.rotary_emb = LlamaRotary(config.head_dim, config.rope_theta)
        self.apply(_init_weights)
        self._init_training_attention()

    @property
    def logit_shift(self) -> bool:
        return self.config.logit_shift

    @property
    def output_weight(self) -> torch.Tensor:
        """[V, hidden]: the output layer's matrix (the embeddings when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # -- hooks ---------------------------------------------------------------------------

    def _trunk(self, tokens, sigma, attend_for_layer):
        """Embed and run every layer with attend_for_layer(i) as its attention -> (the final
        hidden states [B, S, hidden] before the output norm, None: no conditioning; sigma
        is ignored)."""
        x = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, attend_for_layer(i))
        return x, None

    def _output(self, hidden, cond):
        """Final hidden states [..., hidden] -> logits [..., V]."""
        return F.linear(self.model.norm(hidden), self.output_weight)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None) -> BlockKVCache:
        """A preallocated cache of up to ``max_len`` committed tokens per row (default
        ``model_length - block_size``); a LastHiddenKVCache for a logit-shift model."""
        cfg = self.config
        if max_len is None:
            max_len = max(cfg.model_length - cfg.block_size, 1)
        shape = (cfg.num_hidden_layers, batch_size, max_len, cfg.num_key_value_heads, cfg.head_dim)
        where = dict(device=device or self.device, dtype=dtype or self.dtype)
        if cfg.logit_shift:
            return LastHiddenKVCache(*shape, hidden_size=cfg.hidden_size, **where)
        return BlockKVCache(*shape, **where)

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None, **options) -> "LlamaBlockDiffusionLM":
        """Load a did_engine checkpoint, a Hugging Face directory or hub name (sdar,
        Fast_dLLM_Qwen, llama, qwen2, qwen3) or a .gguf file; ``options`` (mask_id,
        block_size, cache_dir, revision) as did_engine.modeling.hf_checkpoints.load_llama's."""
        from did_engine.modeling.hf_checkpoints import load_llama

        return load_llama(name_or_path, device=device, dtype=dtype, **options)


def _init_weights(module) -> None:
    """Transformers' initialisation (normal, std 0.02; zero biases; norms at one)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
