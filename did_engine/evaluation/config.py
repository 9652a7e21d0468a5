"""What an evaluation runs: the sample count, seeds, prompt and sampler (EvalConfig) and
BD3-LM's low-entropy rejection rule; their fields are `did-engine eval`'s options.

**Seeds.** Sample i of base seed s is drawn with its own ``torch.Generator`` seeded with
``s * 1_000_000 + i`` (``sample_seed``), and redraws continue that generator, so the
sampler makes a sample independent of the batch it was generated in. Its logits are
only as batch-independent as the BLAS: a batched matmul may round differently from a
single-row one (~1e-6), which can flip a draw at a near tie (see did_engine.sampling.sampler).

**BD3-LM's low-entropy rejection** (optional): a sample whose last 256 tokens have a
unigram entropy below 4 nats is degenerate (repetitive); it is discarded and drawn again
(BD3-LM gives up after 10 attempts; here the last draw is kept and counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from did_engine.errors import UserError
from did_engine.evaluation.metrics import unigram_entropy
from did_engine.parsing import finite_float, opt, parse_list, positive_int, token_ids

SEED_STRIDE = 1_000_000
SAMPLES = "samples"


class EvalError(UserError):
    """A user-facing evaluation error (printed as one line by the CLI)."""


def sample_seed(seed: int, index: int) -> int:
    """The torch seed of sample ``index`` under base seed ``seed``."""
    return seed * SEED_STRIDE + index


def _seeds(text: str) -> list:
    seeds = parse_list(text, int, "seeds")
    if not seeds:
        raise EvalError("give at least one seed")
    return seeds


@dataclass
class RejectionRule:
    """BD3-LM's low-entropy rule: reject a sample whose last ``window`` tokens have a
    unigram entropy below ``threshold`` nats; draw it again at most ``max_redraws`` times."""

    window: int = field(default=256, metadata=opt("tokens the rejection rule looks at", group=SAMPLES,
                                                  flag="--entropy-window", parse=positive_int))
    threshold: float = field(default=4.0, metadata=opt("rejection threshold in nats", group=SAMPLES,
                                                       flag="--entropy-threshold", parse=finite_float))
    max_redraws: int = field(default=10, metadata=opt("redraws per sample before keeping the last", group=SAMPLES))

    def __post_init__(self):
        if self.window < 1 or self.max_redraws < 0:
            raise EvalError(f"entropy window must be >= 1 and max redraws >= 0, got {self.window}, {self.max_redraws}")

    def rejects(self, ids) -> bool:
        ids = torch.as_tensor(ids).reshape(-1)
        return unigram_entropy(ids[-self.window:]) < self.threshold


@dataclass
class EvalConfig:
    """How many samples, in what batches, under which seeds, with which sampler."""

    sampler: object = None  # did_engine.sampling.SamplerConfig (None: the defaults)
    num_samples: int = field(default=32, metadata=opt(
        "samples per seed (BD3-LM's protocol uses 300)", group=SAMPLES, parse=positive_int))
    batch_size: int = field(default=8, metadata=opt("samples generated together", group=SAMPLES, parse=positive_int))
    seeds: list = field(default_factory=lambda: [0], metadata=opt(
        "base seeds, comma separated; sample i of seed s uses torch seed s*1000000+i", group=SAMPLES, parse=_seeds))
    prompt: list | None = field(default=None, metadata=opt(
        "token ids every sample starts with (default: the tokenizer's BOS, as in training)", group=SAMPLES,
        flag="--prompt-ids", parse=token_ids))
    rejection: RejectionRule | None = None  # BD3-LM's low-entropy rule; None: off
    keep_texts: bool = field(default=False, metadata=opt("put every sample's text into the JSON report",
                                                         group=SAMPLES))

    def __post_init__(self):
        from did_engine.sampling import SamplerConfig

        if self.sampler is None:
            self.sampler = SamplerConfig()
        if self.num_samples < 1 or self.batch_size < 1:
            raise EvalError(f"num_samples and batch_size must be >= 1, got {self.num_samples}, {self.batch_size}")
        if self.num_samples > SEED_STRIDE:
            raise EvalError(f"at most {SEED_STRIDE} samples per seed")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise EvalError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
