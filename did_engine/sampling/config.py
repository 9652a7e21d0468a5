"""What decides a generation and what it returns: SamplerConfig, RefineStage, GenerationResult.

Every field is checked when the dataclass is built: a bad setting (a NaN temperature,
length 0, an unknown strategy, ...) raises ``did_engine.errors.UserError`` naming it,
before any model call. See sampler.py for what the settings do.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from did_engine.errors import UserError
from did_engine.parsing import finite_float, nonnegative_int, opt, positive_int

DRAFT_STRATEGIES = ("first_hitting", "topk", "threshold")
REMASK_POLICIES = ("snapshot", "posthoc", "random")
METHODS = ("did", "mdlm")


def check_int(name: str, value, minimum: int, none_ok: bool = False) -> None:
    """value must be an int >= minimum (not a bool, not a float that int() would truncate)."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{name} must be an integer{' or None' if none_ok else ''}, got {value!r}")
    if value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value, low: float, high: float | None, low_open: bool = False) -> None:
    """value must be a finite real number in [low, high] ((low, high] with low_open; no upper
    bound with high None): NaN and infinities are refused, as a NaN temperature would
    silently turn every draw into token 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        interval = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{']' if high is not None else ')'}"
        raise UserError(f"{name} must be in {interval}, got {value}")


def as_refine_stage(stage) -> RefineStage:
    """A RefineStage, or a (block_size, remask_ratio, steps) tuple (a prefix of it) -> a RefineStage."""
    if isinstance(stage, RefineStage):
        return stage
    if not isinstance(stage, (list, tuple)) or not 1 <= len(stage) <= 3:
        raise UserError(f"a refinement stage must be a RefineStage or a (block_size, remask_ratio, steps) tuple, "
                        f"got {stage!r}")
    return RefineStage(*stage)


@dataclass
class RefineStage:
    """One refinement stage: remask ``remask_ratio`` of the generated tokens, refill them
    with blocks of ``block_size`` (None: one global block) in at most ``steps`` model calls
    per block (None: one token per call)."""

    block_size: int | None = None
    remask_ratio: float = 0.25
    steps: int | None = 8
    order: str = "confidence"  # which masked tokens a step fills first: "confidence" or "random"
    # Global stages only, approximate: after the first step's full forward, later steps re-run
    # only the remasked positions against the stored K/V of the rest (model.refine_forward).
    reuse_context: bool = False

    def __post_init__(self):
        check_int("refine block_size", self.block_size, 1, none_ok=True)
        _check_number("remask_ratio", self.remask_ratio, 0.0, 1.0)
        check_int("refine steps", self.steps, 1, none_ok=True)
        if self.order not in ("confidence", "random"):
            raise UserError(f"refine order must be 'confidence' or 'random', got {self.order!r}")
        if not isinstance(self.reuse_context, bool):
            raise UserError(f"reuse_context must be True or False, got {self.reuse_context!r}")


@dataclass
class SamplerConfig:
    """Everything that decides how DiDSampler generates (see the module docstring). A field
    with ``opt`` metadata is also an option of `did-engine generate` and `eval`."""

    length: int | None = None  # tokens in the output, prompt included; None: the model's context
    block_size: int = field(default=4, metadata=opt("draft block size", group="draft", parse=positive_int))
    strategy: str = field(default="first_hitting", metadata=opt(
        "which masked positions each draft step fills: one uniformly chosen (BD3-LM), the k most confident, "
        "or all above a threshold", group="draft", choices=DRAFT_STRATEGIES))
    tokens_per_step: int = field(default=2, metadata=opt("k of the topk strategy", group="draft", parse=positive_int))
    threshold: float = field(default=0.9, metadata=opt("tau of the threshold strategy", group="draft",
                                                       parse=finite_float))
    min_tokens_per_step: int = field(default=1, metadata=opt(
        "threshold strategy: each step fills at least this many of the most confident positions "
        "(1: Fast-dLLM v2's rule; k > 1: SDAR's low_confidence_dynamic)", group="draft", parse=positive_int))
    stages: list = field(default_factory=list)  # RefineStage or (block_size, remask_ratio, steps) tuples
    remask_policy: str = field(default="snapshot", metadata=opt(
        "which tokens a stage remasks: lowest snapshot confidence (DiD), lowest probability under a "
        "re-scoring forward, or random", group="refinement", flag="--policy", choices=REMASK_POLICIES))
    method: str = field(default="did", metadata=opt(
        "did: block draft + refinement stages; mdlm: global sampling from all-mask (baseline)", group="draft",
        choices=METHODS))
    mdlm_steps: int | None = field(default=None, metadata=opt(
        "model calls of the mdlm method (default: one per token)", group="draft", parse=positive_int))
    top_p: float = field(default=0.9, metadata=opt("nucleus sampling mass", group="sampling", parse=finite_float))
    temperature: float = field(default=1.0, metadata=opt("softmax temperature (0: greedy)", group="sampling",
                                                         parse=finite_float))
    eos_id: int | None = field(default=None, metadata=opt("end-of-sequence token id", group="sampling",
                                                          parse=nonnegative_int))
    stop_at_eos: bool = field(default=False, metadata=opt("end each sample at its first EOS", group="sampling"))
    mask_id: int | None = None  # None: the model's mask_id

    def __post_init__(self):
        if not isinstance(self.stages, (list, tuple)):
            raise UserError(f"stages must be a list of RefineStage or (block_size, remask_ratio, steps) tuples, "
                            f"got {type(self.stages).__name__}")
        self.stages = [as_refine_stage(s) for s in self.stages]
        if self.strategy not in DRAFT_STRATEGIES:
            raise UserError(f"strategy must be one of {DRAFT_STRATEGIES}, got {self.strategy!r}")
        if self.remask_policy not in REMASK_POLICIES:
            raise UserError(f"remask_policy must be one of {REMASK_POLICIES}, got {self.remask_policy!r}")
        if self.method not in METHODS:
            raise UserError(f"method must be one of {METHODS}, got {self.method!r}")
        # length 0 is refused, not read as "the model's context" (None says that).
        check_int("length", self.length, 1, none_ok=True)
        check_int("block_size", self.block_size, 1)
        check_int("tokens_per_step", self.tokens_per_step, 1)
        check_int("min_tokens_per_step", self.min_tokens_per_step, 1)
        if self.min_tokens_per_step != 1 and self.strategy != "threshold":
            raise UserError(f"min_tokens_per_step applies to the threshold strategy, not {self.strategy!r} "
                            f"(topk fills tokens_per_step positions per call)")
        check_int("mdlm_steps", self.mdlm_steps, 1, none_ok=True)
        _check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_number("temperature", self.temperature, 0.0, None)
        _check_number("threshold", self.threshold, 0.0, 1.0)
        check_int("eos_id", self.eos_id, 0, none_ok=True)
        check_int("mask_id", self.mask_id, 0, none_ok=True)
        if not isinstance(self.stop_at_eos, bool):
            raise UserError(f"stop_at_eos must be True or False, got {self.stop_at_eos!r}")
        if self.stop_at_eos and self.eos_id is None:
            raise UserError("stop_at_eos needs eos_id")

    @classmethod
    def bd3lm(cls, **overrides) -> "SamplerConfig":
        """BD3-LM's own sampler: first-hitting draft, nucleus 0.9, no refinement."""
        return cls(**{"strategy": "first_hitting", "stages": [], **overrides})


@dataclass
class GenerationResult:
    """What a generation produced and what it cost.

    tokens / draft_tokens   int64 [B, length] after refinement / after the draft
    confidence              float32 [B, length]: each token's latest snapshot confidence
                            (+inf at prompt positions)
    draft_confidence        the same after the draft
    remasked                {stage: int64 [B, k]} positions remasked, ascending, -1 padded
    nfe                     {stage: {"decode"|"forward"|"rescore"|"commit": calls}}
    seconds                 {stage: wall seconds}
    lengths                 int64 [B]: tokens per row (shorter than length after an EOS stop)
    prompt_length           prompt tokens at the start of every row
    text / draft_text       decoded rows when a tokenizer was given
    """

    tokens: torch.Tensor
    draft_tokens: torch.Tensor
    confidence: torch.Tensor
    draft_confidence: torch.Tensor
    remasked: dict
    nfe: dict
    seconds: dict
    lengths: torch.Tensor
    prompt_length: int
    text: list | None = None
    draft_text: list | None = None

    @property
    def total_nfe(self) -> int:
        return sum(sum(v.values()) for v in self.nfe.values())

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def tokens_per_second(self) -> float:
        generated = int((self.lengths - self.prompt_length).clamp(min=0).sum())
        return generated / self.total_seconds if self.total_seconds > 0 else float("inf")

    def summary_table(self) -> str:
        """A plain-text table: per stage, model calls by kind and wall time."""
        kinds = sorted({k for v in self.nfe.values() for k in v})
        header = ["stage"] + kinds + ["seconds"]
        rows = [[stage] + [str(self.nfe[stage].get(k, 0)) for k in kinds] + [f"{self.seconds.get(stage, 0.0):.2f}"]
                for stage in self.nfe]
        rows.append(["total"] + [str(sum(self.nfe[s].get(k, 0) for s in self.nfe)) for k in kinds]
                    + [f"{self.total_seconds:.2f}"])
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])

