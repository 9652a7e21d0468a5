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

from did_engine import ops
from did_engine.errors import UserError
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
from did_engine.modeling.dit import BlockDiffusionLM
from did_engine.modeling.layers import (
    FLEX_TRAINING_ATTENTION,
    _at_least_float32,
    apply_rotary,
    block_diffusion_mask,
    resolve_training_attention,
)

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


def _sdpa(q, k, v, mask=None):
    """q [B, S, H, D], k/v [B, T, H_kv, D] (any strides) -> [B, S, H, D]: PyTorch SDPA with
    grouped-query heads (differentiable)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------
# The model


class LlamaBlockDiffusionLM(nn.Module):
    """Block diffusion LM over Llama / Qwen2 / Qwen3 blocks. See the module docstring."""

    # The sampler may ask for logits at some positions only, and fold a commit into the
    # next block's first decode call (as with BlockDiffusionLM).
    supports_logit_positions = True
    supports_commit_and_decode = True
    # A prompt of several blocks goes into an empty cache in one block-causal forward.
    prefill_in_one_pass = True
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
        self._mask_cache: dict = {}
        # The training forward's attention, as BlockDiffusionLM's: None reads
        # DID_ENGINE_TRAIN_ATTENTION (auto: FlexAttention on CUDA, dense-mask SDPA elsewhere).
        self.training_attention: str | None = None
        self.last_training_attention: str | None = None

    @property
    def mask_id(self) -> int:
        return self.config.mask_id

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def output_weight(self) -> torch.Tensor:
        """[V, hidden]: the output layer's matrix (the embeddings when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- shared pieces ------------------------------------------------------------------

    def _layers(self, tokens, attend_for_layer):
        """Embed and run every layer with attend_for_layer(i) as its attention -> the final
        hidden states [B, S, hidden] (before the output norm)."""
        x = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, attend_for_layer(i))
        return x

    def _head(self, hidden):
        """Final hidden states [..., hidden] -> logits [..., V]."""
        return F.linear(self.model.norm(hidden), self.output_weight)

    def _logits(self, hidden, logit_positions=None, before=None):
        """Logits [B, S, V] aligned to the positions they predict, or [M, V] at the true
        positions of logit_positions [B, S]. With logit_shift, position i takes the hidden
        state of i - 1 and position 0 that of ``before`` [B, hidden] (the position preceding
        the chunk; None or zeros: none, zero logits)."""
        B, S, _ = hidden.shape
        if self.config.logit_shift:
            first = hidden.new_zeros(B, 1, hidden.shape[-1]) if before is None else before[:, None].to(hidden.dtype)
            hidden = torch.cat([first, hidden[:, :-1]], dim=1)
        if logit_positions is not None:
            if logit_positions.shape != (B, S) or logit_positions.dtype != torch.bool:
                raise ValueError(f"logit_positions must be a bool tensor of the tokens' shape {(B, S)}")
            # The output layer is a large share of a forward with a big vocabulary: run it
            # only where logits are wanted (the masked positions, when sampling).
            hidden = hidden[logit_positions]  # [M, hidden]
        return self._head(hidden)

    def _last_hidden(self, cache):
        """The cache's hidden state of the last committed position ([B, hidden]; None for a
        model without logit shift)."""
        if not self.config.logit_shift:
            return None
        if not isinstance(cache, LastHiddenKVCache):
            raise ValueError("a logit-shift model needs the cache from its new_kv_cache (a LastHiddenKVCache)")
        return cache.last_hidden

    def _remember_last(self, cache, hidden) -> None:
        """After a commit of hidden [B, n, hidden]: keep its last position for the next block."""
        if self.config.logit_shift:
            self._last_hidden(cache).copy_(hidden[:, -1])

    # The DiT's argument checks: they depend on nothing architectural.
    _check_tokens = BlockDiffusionLM._check_tokens
    _check_block = BlockDiffusionLM._check_block
    _check_forward_args = BlockDiffusionLM._check_forward_args
    _check_refine_args = BlockDiffusionLM._check_refine_args

    def _rotate(self, q, k, cos, sin):
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    # -- forwards -----------------------------------------------------------------------

    def forward(self, tokens, x0=None, block_size: int | None = None, sigma=None, logit_positions=None):
        """Logits [B, L, V] aligned to the positions they predict ([M, V] at the true
        positions of logit_positions; not for the training forward). ``sigma`` is ignored.

        - ``model(x_t, x0=x_0, block_size=b)``: training forward over cat(x_t, x_0) under
          the block diffusion mask; logits of the x_t half (b >= L: a global forward on x_t).
        - ``model(tokens, block_size=b)``: block-causal, no cache.
        - ``model(tokens)``: global bidirectional.
        """
        self._check_forward_args(tokens, x0, block_size, logit_positions)
        L = tokens.shape[1]
        if x0 is not None and block_size < L:
            return self._training_forward(tokens, x0, block_size)
        cos, sin = self.rotary_emb.cos_sin(torch.arange(L, device=tokens.device))
        if block_size is None or block_size >= L:
            def attend(q, k, v):
                return _sdpa(*self._rotate(q, k, cos, sin), v)
        elif torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # Differentiable path (the op is forward-only): SDPA with a dense mask.
            mask = ops.reference.block_causal_mask(L, block_size, device=tokens.device)

            def attend(q, k, v):
                return _sdpa(*self._rotate(q, k, cos, sin), v, mask)
        else:
            def attend(q, k, v):
                return ops.block_causal_attention(*self._rotate(q, k, cos, sin), v, block_size)
        return self._logits(self._layers(tokens, lambda i: attend), logit_positions)

    def _training_forward(self, x_t, x0, block_size):
        B, L = x_t.shape
        cos, sin = self.rotary_emb.cos_sin(torch.arange(L, device=x_t.device).repeat(2))  # both halves: 0..L-1
        path = resolve_training_attention(self.training_attention, x_t.device)
        if path == "sdpa":
            key = (L, block_size, str(x_t.device))
            if key not in self._mask_cache:
                self._mask_cache[key] = block_diffusion_mask(L, block_size, device=x_t.device)  # [2L, 2L]
            mask = self._mask_cache[key]
            self.last_training_attention = "sdpa-dense"

            def attend(q, k, v):
                return _sdpa(*self._rotate(q, k, cos, sin), v, mask)
        else:
            flex = FLEX_TRAINING_ATTENTION
            group = self.config.num_attention_heads // self.config.num_key_value_heads

            def attend(q, k, v):
                q, k = self._rotate(q, k, cos, sin)
                # The shared FlexAttention path takes one K/V head per query head.
                k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
                out = flex(q, k, v, L, block_size, compiled=path == "flex")
                self.last_training_attention = flex.last_path
                return out

        hidden = self._layers(torch.cat([x_t, x0], dim=1), lambda i: attend)  # [B, 2L, hidden]
        if not self.config.logit_shift:
            return self._head(hidden[:, :L])
        # Token i is predicted from position i - 1: in the x_0 stream when i starts a block
        # (an x_t block does not see the x_t block before it), in the x_t stream otherwise.
        # Index 0 of `padded` is a zero row: position 0 has no predecessor (zero logits).
        i = torch.arange(L, device=x_t.device)
        source = torch.where(i % block_size == 0, L + i, i)  # = (index of position i - 1) + 1 in padded
        source[0] = 0
        padded = torch.cat([hidden.new_zeros(B, 1, hidden.shape[-1]), hidden], dim=1)
        return self._head(padded[:, source])

    # -- KV-cached sampling --------------------------------------------------------------

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

    def decode(self, block_tokens, cache: BlockKVCache, sigma=None, logit_positions=None):
        """Logits [B, n, V] of the active block against the cache ([M, V] at the true
        positions of logit_positions [B, n]); the cache is unchanged. With logit shift, row
        0 comes from the cached last committed position."""
        self._check_block(block_tokens, cache)
        n = block_tokens.shape[1]
        if n > cache.capacity:
            raise ValueError(f"a block of {n} tokens exceeds the cache capacity {cache.capacity}")
        before = self._last_hidden(cache)
        cos, sin = self.rotary_emb.cos_sin(cache.positions(n))  # [B, n, 1, D/2]

        def attend_for_layer(i):
            def attend(q, k, v):
                q, k = self._rotate(q, k, cos, sin)
                return ops.block_decode_attention(q, cache.k[i], cache.v[i], k, v, cache.lengths)
            return attend

        return self._logits(self._layers(block_tokens, attend_for_layer), logit_positions, before)

    @torch.no_grad()
    def commit(self, block_tokens, cache: BlockKVCache, sigma=None, block_size: int | None = None) -> int:
        """Append a finished block's K/V to the cache (one forward over the clean block),
        and with logit shift its last position's hidden state. A chunk longer than
        ``block_size`` (a prompt) is the block-causal prefill: one forward into an empty
        cache (``prefill_in_one_pass``), otherwise block by block. When the cache is full,
        the oldest blocks slide out. Returns the number of forwards run."""
        self._check_block(block_tokens, cache)
        n = block_tokens.shape[1]
        step = block_size or n
        if n > step and self.prefill_in_one_pass and cache.known_empty and n <= cache.capacity:
            self._prefill(block_tokens, cache, step)
            return 1
        for start in range(0, n, step):
            chunk = block_tokens[:, start : start + step]
            cache.make_room(chunk.shape[1], block_size=self.config.block_size)
            cos, sin = self.rotary_emb.cos_sin(cache.positions(chunk.shape[1]))

            def attend_for_layer(i):
                def attend(q, k, v):
                    q, k = self._rotate(q, k, cos, sin)
                    out = ops.block_decode_attention(q, cache.k[i], cache.v[i], k, v, cache._layer_lengths[i])
                    cache.commit_layer(i, k, v)
                    return out
                return attend

            self._remember_last(cache, self._layers(chunk, attend_for_layer))
        return -(-n // step)

    def _prefill(self, tokens, cache: BlockKVCache, block_size: int) -> None:
        """One block-causal forward over a prompt [B, P] into an empty cache."""
        cache.make_room(tokens.shape[1], block_size=self.config.block_size)
        cos, sin = self.rotary_emb.cos_sin(cache.positions(tokens.shape[1]))  # [B, P, 1, D/2]

        def attend_for_layer(i):
            def attend(q, k, v):  # [B, P, H, D]
                q, k = self._rotate(q, k, cos, sin)
                out = ops.block_causal_attention(q, k, v, block_size)
                cache.commit_layer(i, k, v)
                return out
            return attend

        self._remember_last(cache, self._layers(tokens, attend_for_layer))

    @torch.no_grad()
    def commit_and_decode(self, clean_tokens, block_tokens, cache: BlockKVCache, sigma=None, logit_positions=None):
        """``commit(clean_tokens, cache)`` then ``decode(block_tokens, cache)`` in one forward
        (the weights are read once). Attention keeps the two calls' semantics: the clean
        rows see the cache and themselves, the block rows the cache, the clean block and
        themselves. Returns the block's logits [B, n, V], or [M, V] at logit_positions."""
        self._check_block(clean_tokens, cache)
        self._check_block(block_tokens, cache)
        n1, n2 = clean_tokens.shape[1], block_tokens.shape[1]
        if logit_positions is not None and (logit_positions.shape != block_tokens.shape
                                            or logit_positions.dtype != torch.bool):
            raise ValueError(f"logit_positions must be a bool tensor of the block's shape {tuple(block_tokens.shape)}")
        before = self._last_hidden(cache)
        cache.make_room(n1, block_size=self.config.block_size)
        if n2 > cache.capacity:
            raise ValueError(f"a block of {n2} tokens exceeds the cache capacity {cache.capacity}")
        cos, sin = self.rotary_emb.cos_sin(cache.positions(n1 + n2))  # [B, n1 + n2, 1, D/2]

        def attend_for_layer(i):
            def attend(q, k, v):
                q, k = self._rotate(q, k, cos, sin)  # [B, n1 + n2, H or H_kv, D]
                lengths = cache._layer_lengths[i]
                clean = ops.block_decode_attention(q[:, :n1], cache.k[i], cache.v[i], k[:, :n1], v[:, :n1], lengths)
                cache.commit_layer(i, k[:, :n1], v[:, :n1])  # advances lengths by n1
                block = ops.block_decode_attention(q[:, n1:], cache.k[i], cache.v[i], k[:, n1:], v[:, n1:], lengths)
                return torch.cat([clean, block], dim=1)
            return attend

        B = block_tokens.shape[0]
        hidden = self._layers(torch.cat([clean_tokens, block_tokens], dim=1), attend_for_layer)
        wanted = torch.ones_like(block_tokens, dtype=torch.bool) if logit_positions is None else logit_positions
        need = torch.cat([torch.zeros(B, n1, dtype=torch.bool, device=wanted.device), wanted], dim=1)
        logits = self._logits(hidden, need, before)  # the shift reaches across into the clean block
        self._remember_last(cache, hidden[:, :n1])
        return logits if logit_positions is not None else logits.view(B, n2, -1)

    @torch.no_grad()
    def refine_forward(self, tokens, context: BlockKVCache, positions=None, write=None, sigma=None,
                       logit_positions=None):
        """Global bidirectional forward that keeps every layer's K/V in ``context``, then
        re-runs only some positions against them (approximate refinement steps), as
        BlockDiffusionLM.refine_forward:

        - ``positions=None``: the global forward ``model(tokens)``; each layer's K/V of all
          L tokens are written to ``context`` (capacity >= L).
        - ``positions`` int64 [B, r]: those tokens go through the layers, overwrite their
          K/V in ``context`` (where ``write`` [B, r] is true) and attend over all L stored
          keys. With logit shift the logits at p come from position p - 1, so the
          predecessors p - 1 are re-run too, as queries that write nothing (2r rows).

        Returns logits [B, S, V] (S = L or r), or [M, V] at logit_positions ([B, S] bool).
        """
        self._check_refine_args(tokens, context, positions, write)
        B, L = tokens.shape
        shift = self.config.logit_shift
        if positions is None:
            rows, where, keep = tokens, torch.arange(L, device=tokens.device)[None], None  # [1, L]
        else:
            r = positions.shape[1]
            if r == 0:  # nothing to re-run
                V = self.config.vocab_size
                return tokens.new_zeros((0, V) if logit_positions is not None else (B, 0, V), dtype=self.dtype)
            keep = torch.ones_like(positions, dtype=torch.bool) if write is None else write
            where = positions
            if shift:
                where = torch.cat([positions, (positions - 1).clamp(min=0)], dim=1)  # [B, 2r]
                keep = torch.cat([keep, torch.zeros_like(keep)], dim=1)
            rows = tokens.gather(1, where)
        cos, sin = self.rotary_emb.cos_sin(where)  # [B or 1, S, 1, D/2]
        batch_index = None if positions is None else torch.arange(B, device=tokens.device)[:, None].expand_as(where)

        def attend_for_layer(i):
            def attend(q, k, v):
                q, k = self._rotate(q, k, cos, sin)
                if positions is None:
                    context.k[i, :, :L], context.v[i, :, :L] = k, v
                    return _sdpa(q, k, v)
                context.k[i][batch_index[keep], where[keep]] = k[keep]
                context.v[i][batch_index[keep], where[keep]] = v[keep]
                return _sdpa(q, context.k[i, :, :L], context.v[i, :, :L])
            return attend

        hidden = self._layers(rows, attend_for_layer)
        if positions is None:
            context.set_lengths(L)
            return self._logits(hidden, logit_positions)
        if shift:  # the predecessors' hidden states; position 0 has none (zero logits)
            hidden = torch.where((positions > 0)[..., None], hidden[:, r:], 0.0)
        if logit_positions is not None:
            if logit_positions.shape != positions.shape or logit_positions.dtype != torch.bool:
                raise ValueError(f"logit_positions must be a bool tensor of the positions' shape "
                                 f"{tuple(positions.shape)}")
            hidden = hidden[logit_positions]
        return self._head(hidden)

    # -- checkpoints ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None, **options) -> "LlamaBlockDiffusionLM":
        """Load a did_engine checkpoint, a Hugging Face directory or hub name (sdar,
        Fast_dLLM_Qwen, llama, qwen2, qwen3) or a .gguf file; ``options`` (mask_id,
        block_size, cache_dir, revision) as did_engine.modeling.hf_checkpoints.load_llama's."""
        from did_engine.modeling.hf_checkpoints import load_llama

        return load_llama(name_or_path, device=device, dtype=dtype, **options)

    def save_pretrained(self, path) -> None:
        """Write config.json + model.safetensors into directory `path` (atomically, no pickle)."""
        from did_engine.modeling.checkpoint import save_pretrained

        save_pretrained(self, path)


def _init_weights(module) -> None:
    """Transformers' initialisation (normal, std 0.02; zero biases; norms at one)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
