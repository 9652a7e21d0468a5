"""Model configuration: ModelConfig (BD3-LM's config.json fields), its checks, and presets.

Kept apart from the model code so that checkpoints (which build a config from a file) and
every model family import it without importing each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from did_engine.errors import UserError


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
    # BD3-LM's switch for its vectorised cat(x_t, x_0) training; carried through checkpoints,
    # not read: the training forward is cat(x_t, x_0) whenever x0 is passed.
    cross_attn: bool = True
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


def estimated_weight_elements(cfg: ModelConfig) -> int:
    """The model's weight count with adaLN (an upper bound without it), from the config alone:
    checked against the limit before anything is allocated."""
    h, c, v = cfg.hidden_dim, cfg.cond_dim, cfg.vocab_size
    per_block = 12 * h * h + 7 * h + 6 * (c + 1) * h  # qkv, out, mlp with biases; 2 norms; adaLN
    return 2 * v * h + v + cfg.n_blocks * per_block + 2 * (c + 1) * h + h + 256 * c + c * c + 2 * c


def check_model_config(cfg: ModelConfig) -> None:
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
