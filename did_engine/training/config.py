"""The training configuration: every option of a run, its help text beside it, its checks.

``TrainConfig`` is the one source of truth for ``did-engine train``'s options (the CLI
generates them from the fields' ``opt`` metadata, see did_engine.parsing).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from did_engine.diffusion import DEFAULT_EPS, SCHEDULES
from did_engine.errors import UserError
from did_engine.modeling.config import PRESETS
from did_engine.parsing import opt, parse_list


class TrainConfigError(UserError):
    """A training option, or a pairing of model, data and options, that cannot train."""


def _key(k):
    """A block size key: 'L' (or 'global') for the whole sequence, else an int."""
    return "L" if str(k).strip() in ("L", "global") else _int(k, "block size")


def _int(text, what):
    try:
        return int(str(text).strip())
    except ValueError:
        raise TrainConfigError(f"{what} must be an integer or L, got {text!r}") from None


def _float(text, what):
    try:
        return float(str(text).strip())
    except ValueError:
        raise TrainConfigError(f"{what} must be a number, got {text!r}") from None


def _block_size_entry(part: str) -> tuple:
    if ":" not in part:
        raise TrainConfigError(f"block size entry {part!r} must be SIZE:PROB, e.g. 4:0.9,L:0.1")
    size, prob = part.split(":", 1)
    return _key(size), _float(prob, f"probability of block size {size}")


def _clip_entry(part: str) -> tuple:
    pieces = part.split(":")
    if len(pieces) != 3:
        raise TrainConfigError(f"clip entry {part!r} must be SIZE:EPS_MIN:EPS_MAX, e.g. 4:0.3:0.8")
    return _key(pieces[0]), [_float(pieces[1], "eps_min"), _float(pieces[2], "eps_max")]


def parse_block_sizes(text: str) -> dict:
    """'4:0.9,L:0.1' -> {4: 0.9, 'L': 0.1}."""
    return dict(parse_list(text, _block_size_entry, spaces=False))


def parse_clip(text: str) -> dict:
    """'4:0.3:0.8,L:0.001:1' -> {4: [0.3, 0.8], 'L': [0.001, 1.0]}."""
    return dict(parse_list(text, _clip_entry, spaces=False))


def _widths(text: str) -> tuple:
    return tuple(parse_list(text, float, "--clip-search-widths"))


DATA, MIX, OPTIM, RUNTIME, LOGGING = ("data and model", "mix-scale block diffusion", "optimisation", "runtime",
                                      "logging, evaluation, checkpoints")


@dataclass
class TrainConfig:
    """Everything a run depends on. ``check(seq_len)`` validates it before training starts."""

    # data and model
    data: str = field(default="", metadata=opt(
        "prepared dataset directory (from `did-engine data prepare`): train.bin, validation.bin, manifest.json, "
        "tokenizer.json", group=DATA, required=True))
    out: str = field(default="runs/train", metadata=opt(
        "run directory: checkpoints/, final/ (the trained model), metrics.jsonl, loss.png, train_config.json",
        group=DATA))
    model: str = field(default="preset:tiny", metadata=opt(
        "preset:NAME (tiny, small; vocabulary and L are taken from the data) to train a DiT from scratch; a "
        "checkpoint to fine-tune (ours of either class, BD3-LM's, an SDAR / Fast-dLLM v2 Hugging Face directory or "
        "hub name: mix-scale training of a block diffusion LM); or a causal LM to adapt (a llama / qwen2 / qwen3 "
        "directory or hub name, a .gguf file, smollm2-135m: a mask token is added, logit shift on). The data must "
        "be tokenised with the model's tokenizer",
        group=DATA))
    dropout: float | None = field(default=None, metadata=opt("override the model's dropout probability (DiT only)",
                                                                    group=DATA))
    lora_rank: int = field(default=0, metadata=opt(
        "train LoRA adapters of this rank on the attention and MLP projections (plus the norms and the mask "
        "row), the base frozen; checkpoints are then small deltas (adapter + the base's sha256). 0: train every "
        "weight (Llama-family models only)", group=DATA))
    lora_alpha: float = field(default=0.0, metadata=opt(
        "LoRA scale numerator: the change is (alpha / rank) B A (0: 2 x rank)", group=DATA))
    lora_targets: tuple = field(default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj"), metadata=opt(
        "projections that get LoRA adapters (comma-separated)", group=DATA, parse=lambda text: tuple(
            parse_list(text, str, "--lora-targets"))))
    # mix-scale block diffusion
    block_sizes: dict = field(default_factory=lambda: {4: 0.9, "L": 0.1}, metadata=opt(
        "block size distribution SIZE:PROB,...; each training sequence draws its block size; L = the whole "
        "sequence (global block). Sizes must divide L, probabilities sum to 1", group=MIX, parse=parse_block_sizes))
    clip: dict = field(default_factory=dict, metadata=opt(
        "noise clipping per block size SIZE:EPS_MIN:EPS_MAX,... (t ~ U[eps_min, eps_max]); unlisted sizes use "
        "[0.001, 1], the unclipped NELBO", group=MIX, parse=parse_clip))
    clip_search: bool = field(default=False, metadata=opt(
        "at every evaluation, pick each block size's clipping interval that minimises the variance of the "
        "per-block validation loss (BD3-LM's data-driven noise schedule)", group=MIX))
    clip_search_widths: tuple = field(default=(0.5, 0.6, 0.7, 0.8, 0.9), metadata=opt(
        "interval widths tried by --clip-search (comma list)", group=MIX, parse=_widths))
    clip_search_delta: float = field(default=0.05, metadata=opt(
        "grid step of interval starts tried by --clip-search", group=MIX))
    clip_search_batches: int = field(default=4, metadata=opt(
        "validation batches per candidate interval in --clip-search", group=MIX))
    schedule: str = field(default="loglinear", metadata=opt(
        f"noise schedule ({', '.join(sorted(SCHEDULES))})", group=MIX))
    antithetic: bool = field(default=True, metadata=opt(
        "stratified (antithetic) noise levels across a batch's blocks", group=MIX))
    resample: bool = field(default=True, metadata=opt(
        "redraw a block's mask when its masked fraction leaves a clipped interval (as BD3-LM)", group=MIX))
    ignore_bos: bool = field(default=True, metadata=opt(
        "never mask position 0 (BOS); evaluation does not count it", group=MIX))
    # optimisation
    batch_size: int = field(default=16, metadata=opt(
        "global batch: sequences per optimizer step over all processes (a multiple of their number)", group=OPTIM))
    micro_batch_size: int = field(default=0, metadata=opt(
        "sequences per forward pass on each process; smaller than the per-process batch accumulates gradients over "
        "several passes (same result, less memory); 0 = all at once", group=OPTIM))
    max_steps: int = field(default=1000, metadata=opt("optimizer steps of the whole run", group=OPTIM))
    lr: float = field(default=3e-4, metadata=opt("peak learning rate of AdamW", group=OPTIM))
    warmup_steps: int = field(default=100, metadata=opt("linear warmup steps from 0 to --lr", group=OPTIM))
    lr_decay: str = field(default="constant", metadata=opt(
        "after warmup: constant (BD3-LM) or cosine down to --min-lr at --max-steps", group=OPTIM,
        choices=("constant", "cosine")))
    min_lr: float = field(default=0.0, metadata=opt("final learning rate of the cosine decay", group=OPTIM))
    weight_decay: float = field(default=0.0, metadata=opt(
        "AdamW weight decay (matrices only; norms, biases, embeddings' vectors excluded)", group=OPTIM))
    beta1: float = field(default=0.9, metadata=opt("AdamW beta1", group=OPTIM))
    beta2: float = field(default=0.999, metadata=opt("AdamW beta2", group=OPTIM))
    adam_eps: float = field(default=1e-8, metadata=opt("AdamW epsilon", group=OPTIM))
    grad_clip: float = field(default=1.0, metadata=opt("clip the global gradient norm (0: off)", group=OPTIM))
    ema: float = field(default=0.9999, metadata=opt("EMA decay of the weights (0: no EMA)", group=OPTIM))
    # runtime
    device: str = field(default="auto", metadata=opt(
        "auto (this rank's GPU if any, else cpu), cpu, cuda, cuda:N", group=RUNTIME))
    amp: str = field(default="auto", metadata=opt(
        "bf16 autocast: auto = on a GPU, or on a CPU with AMX bf16 units (lscpu: amx_bf16; elsewhere bf16 matmuls "
        "are far slower than fp32)", group=RUNTIME,
        choices=("auto", "bf16", "off")))
    seed: int = field(default=0, metadata=opt("seed of the initial weights, data order and noise", group=RUNTIME))
    # logging, evaluation, checkpoints
    log_every: int = field(default=10, metadata=opt("steps between metrics.jsonl records", group=LOGGING))
    eval_every: int = field(default=0, metadata=opt(
        "steps between validation NELBO evaluations (0: at the end only)", group=LOGGING))
    eval_batches: int = field(default=8, metadata=opt("validation batches per evaluation", group=LOGGING))
    eval_batch_size: int = field(default=8, metadata=opt("sequences per validation batch", group=LOGGING))
    save_every: int = field(default=100, metadata=opt("steps between checkpoints", group=LOGGING))
    keep_checkpoints: int = field(default=2, metadata=opt("checkpoints kept (latest)", group=LOGGING))
    resume: str = field(default="auto", metadata=opt(
        "auto: continue from the latest checkpoint in --out if there is one; never; or a checkpoint directory",
        group=LOGGING))
    final_weights: str = field(default="ema", metadata=opt(
        "which weights out/final holds", group=LOGGING, choices=("ema", "raw")))
    progress: bool = field(default=True, metadata=opt("show a progress bar with loss and tokens/s", group=LOGGING))
    plot: bool = field(default=True, metadata=opt("write loss.png at the end", group=LOGGING))

    parse_block_sizes = staticmethod(parse_block_sizes)
    parse_clip = staticmethod(parse_clip)

    def resolved_block_sizes(self, seq_len: int) -> dict:
        """{int block size: probability} with 'L' replaced by seq_len (entries merged)."""
        out: dict = {}
        for k, p in self.block_sizes.items():
            b = seq_len if str(k) in ("L", "global") else int(k)
            out[b] = out.get(b, 0.0) + float(p)
        return dict(sorted(out.items()))

    def resolved_clip(self, seq_len: int) -> dict:
        out = {b: list(DEFAULT_EPS) for b in self.resolved_block_sizes(seq_len)}
        for k, v in self.clip.items():
            out[seq_len if str(k) in ("L", "global") else int(k)] = [float(v[0]), float(v[1])]
        return out

    def check(self, seq_len: int | None = None, world_size: int = 1) -> None:
        """Raise TrainConfigError with one clear message for a configuration that cannot train."""
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"unknown noise schedule {self.schedule!r}; choose from {', '.join(sorted(SCHEDULES))}")
        if not self.block_sizes:
            raise TrainConfigError("block_sizes is empty: give at least one SIZE:PROB")
        probs = [float(p) for p in self.block_sizes.values()]
        if any(p < 0 for p in probs):
            raise TrainConfigError(f"block size probabilities must be >= 0, got {self.block_sizes}")
        if abs(sum(probs) - 1.0) > 1e-6:
            raise TrainConfigError(f"block size probabilities must sum to 1, got {sum(probs):.6g} ({self.block_sizes})")
        for k in self.block_sizes:
            if str(k) not in ("L", "global") and int(k) < 1:
                raise TrainConfigError(f"block sizes must be >= 1, got {k}")
        if seq_len is not None:
            for b in self.resolved_block_sizes(seq_len):
                if b > seq_len or seq_len % b:
                    raise TrainConfigError(f"block size {b} does not divide the sequence length L = {seq_len}")
            for k in self.clip:
                b = seq_len if str(k) in ("L", "global") else int(k)
                if b not in self.resolved_block_sizes(seq_len):
                    raise TrainConfigError(f"clip interval given for block size {k}, which is not in the mix "
                                           f"{sorted(self.resolved_block_sizes(seq_len))}")
        for k, (lo, hi) in self.clip.items():
            if not (0.0 < lo < hi <= 1.0):
                raise TrainConfigError(f"clip interval of block size {k} must satisfy 0 < eps_min < eps_max <= 1, "
                                       f"got [{lo}, {hi}]")
        if self.batch_size < 1 or self.batch_size % world_size:
            raise TrainConfigError(f"batch_size {self.batch_size} must be a positive multiple of the number of "
                                   f"processes ({world_size})")
        for name in ("max_steps", "log_every", "save_every", "keep_checkpoints", "eval_batches", "eval_batch_size",
                     "clip_search_batches"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size < 0:
            raise TrainConfigError(f"micro_batch_size must be >= 0 (0 = the whole per-process batch), got "
                                   f"{self.micro_batch_size}")
        for name in ("warmup_steps", "eval_every", "weight_decay", "grad_clip", "min_lr"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise TrainConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema < 1.0:
            raise TrainConfigError(f"ema decay must be in [0, 1), got {self.ema}")
        if self.lr_decay not in ("constant", "cosine"):
            raise TrainConfigError(f"lr_decay must be constant or cosine, got {self.lr_decay!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise TrainConfigError(f"amp must be auto, bf16 or off, got {self.amp!r}")
        if self.final_weights not in ("ema", "raw"):
            raise TrainConfigError(f"final_weights must be ema or raw, got {self.final_weights!r}")
        if self.final_weights == "ema" and self.ema == 0:
            self.final_weights = "raw"
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise TrainConfigError(f"lora_rank and lora_alpha must be >= 0, got {self.lora_rank}, {self.lora_alpha}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise TrainConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.clip_search_delta < 1 or not all(0 < w <= 1 for w in self.clip_search_widths):
            raise TrainConfigError("clip_search_delta must be in (0, 1) and the widths in (0, 1]")
        if self.model.startswith("preset:") and self.model.split(":", 1)[1] not in PRESETS:
            raise TrainConfigError(f"unknown preset {self.model!r}; choose from "
                                   f"{', '.join('preset:' + p for p in sorted(PRESETS))}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["block_sizes"] = {str(k): v for k, v in self.block_sizes.items()}
        d["clip"] = {str(k): list(v) for k, v in self.clip.items()}
        d["clip_search_widths"] = list(self.clip_search_widths)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "block_sizes" in d:
            d["block_sizes"] = {_key(k): v for k, v in d["block_sizes"].items()}
        if "clip" in d:
            d["clip"] = {_key(k): v for k, v in d["clip"].items()}
        if "clip_search_widths" in d:
            d["clip_search_widths"] = tuple(d["clip_search_widths"])
        if "lora_targets" in d:
            d["lora_targets"] = tuple(d["lora_targets"])
        return cls(**d)
