"""The Diffusion-in-Diffusion sampler: a block-diffusion draft, then global refinement.

Draft (stage "draft"): the sequence is generated left to right in blocks of
``block_size`` tokens with an exact KV cache. Inside a block, masked positions are
unmasked over several model calls (one ``model.decode`` each) by one of three rules:

    first_hitting   one position per call, chosen uniformly (BD3-LM; NFE = tokens)
    topk            the ``tokens_per_step`` positions whose sampled token is most probable
    threshold       every position whose sampled token has probability >= ``threshold``
                    (at least the most probable one)

When a token is unmasked, the probability the model gave it at that moment is recorded:
its *snapshot confidence* (no extra forward). A finished block's clean K/V go into the
cache: with models that offer ``commit_and_decode`` (did_engine's do) inside the next
block's first decode call, the two blocks sharing one forward (counted as that decode);
otherwise by a separate ``commit`` forward (counted as a commit).

Refinement (stages "refine_1", ...): each stage ``RefineStage(block_size, remask_ratio,
steps)`` sets ``remask_ratio`` of the generated tokens back to the mask token, chosen by
the remask policy, and fills them again with blocks of ``block_size`` (None or >= the
sequence length: one global bidirectional block, every token sees every other):

    snapshot   lowest snapshot confidence (DiD), with the fused ``snapshot_remask`` op
    posthoc    lowest probability under one extra global forward over the finished draft
    random     uniformly random positions

Prompt tokens are never remasked. Refilled tokens get new snapshot confidences, so stages
chain. A global stage with ``reuse_context=True`` (approximate) runs its first step as a
full forward that stores every layer's K/V and its later steps over the remasked positions
only, against the stored K/V of the rest (``model.refine_forward``); a step then costs
about ``remask_ratio`` of a full one. ``DiDSampler.refine`` applies stages to a finished
generation, to compare refinement settings on the same drafts.

Baselines through the same API: ``SamplerConfig.bd3lm()`` (first-hitting draft, no
refinement) and ``method="mdlm"`` (global sampling from an all-mask sequence).

Token sampling follows BD3-LM: SUBS (the mask token is never predicted), temperature,
nucleus (top-p) filtering, and a float64 Gumbel/exponential race for the draw. The
recorded confidence is the model's probability of the token (SUBS softmax at temperature
1, before nucleus filtering), so the ``snapshot`` and ``posthoc`` policies rank by the same
quantity and differ only in *when* it is measured.

Randomness and batching: pass ``generator`` as one ``torch.Generator`` (all rows draw from
it) or as a list with one generator per row. With per-row generators, each row consumes
only its own generator and its step schedule, remask count and padding depend only on its
own state, so a row generated in a batch equals the same row generated alone from the same
generator state, bit for bit, as long as the model's batched arithmetic is row-independent.
did_engine's kernels are; a BLAS may round a batched matmul differently from a single-row
one (MKL does, by ~1e-6), which can flip a draw where two candidates nearly tie. The same
inputs, batch size, thread count and machine always reproduce exactly.

Bad settings (a NaN temperature, length 0, an id outside the vocabulary, a length a global
stage cannot take, ...) raise ``did_engine.errors.UserError`` naming the setting, before any
model call.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field

import torch

from did_engine import ops
from did_engine.errors import UserError

DRAFT_STRATEGIES = ("first_hitting", "topk", "threshold")
REMASK_POLICIES = ("snapshot", "posthoc", "random")
METHODS = ("did", "mdlm")


def _check_int(name: str, value, minimum: int, none_ok: bool = False) -> None:
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


def _as_stage(stage) -> "RefineStage":
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
        _check_int("refine block_size", self.block_size, 1, none_ok=True)
        _check_number("remask_ratio", self.remask_ratio, 0.0, 1.0)
        _check_int("refine steps", self.steps, 1, none_ok=True)
        if self.order not in ("confidence", "random"):
            raise UserError(f"refine order must be 'confidence' or 'random', got {self.order!r}")
        if not isinstance(self.reuse_context, bool):
            raise UserError(f"reuse_context must be True or False, got {self.reuse_context!r}")


@dataclass
class SamplerConfig:
    """Everything that decides how DiDSampler generates (see the module docstring)."""

    length: int | None = None  # tokens in the output, prompt included; None: the model's context
    block_size: int = 4  # draft block size B1
    strategy: str = "first_hitting"
    tokens_per_step: int = 2  # topk strategy
    threshold: float = 0.9  # threshold strategy
    stages: list = field(default_factory=list)  # RefineStage or (block_size, remask_ratio, steps) tuples
    remask_policy: str = "snapshot"
    method: str = "did"  # "did" (block draft + stages) or "mdlm" (global sampling from all-mask)
    mdlm_steps: int | None = None  # model calls of the MDLM baseline; None: one token per call
    top_p: float = 0.9
    temperature: float = 1.0  # 0: greedy
    eos_id: int | None = None
    stop_at_eos: bool = False
    mask_id: int | None = None  # None: the model's mask_id

    def __post_init__(self):
        if not isinstance(self.stages, (list, tuple)):
            raise UserError(f"stages must be a list of RefineStage or (block_size, remask_ratio, steps) tuples, "
                            f"got {type(self.stages).__name__}")
        self.stages = [_as_stage(s) for s in self.stages]
        if self.strategy not in DRAFT_STRATEGIES:
            raise UserError(f"strategy must be one of {DRAFT_STRATEGIES}, got {self.strategy!r}")
        if self.remask_policy not in REMASK_POLICIES:
            raise UserError(f"remask_policy must be one of {REMASK_POLICIES}, got {self.remask_policy!r}")
        if self.method not in METHODS:
            raise UserError(f"method must be one of {METHODS}, got {self.method!r}")
        # length 0 is refused, not read as "the model's context" (None says that).
        _check_int("length", self.length, 1, none_ok=True)
        _check_int("block_size", self.block_size, 1)
        _check_int("tokens_per_step", self.tokens_per_step, 1)
        _check_int("mdlm_steps", self.mdlm_steps, 1, none_ok=True)
        _check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_number("temperature", self.temperature, 0.0, None)
        _check_number("threshold", self.threshold, 0.0, 1.0)
        _check_int("eos_id", self.eos_id, 0, none_ok=True)
        _check_int("mask_id", self.mask_id, 0, none_ok=True)
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


# ---------------------------------------------------------------------------------------
# Drawing tokens


def _row_generators(generator, batch_size: int):
    """None, one generator for all rows, or a list of per-row generators."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    gens = list(generator)
    if len(gens) != batch_size or not all(isinstance(g, torch.Generator) for g in gens):
        raise UserError(f"generator must be a torch.Generator or a list of {batch_size} of them")
    return gens


def _keep_prefix(sorted_p: torch.Tensor, top_p: float) -> torch.Tensor:
    """Descending probabilities [M, k] -> the same with every token after the nucleus zeroed."""
    drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # the mass before a token already suffices
    return sorted_p.masked_fill(drop, 0.0)


def _nucleus_groups(probs: torch.Tensor, top_p: float, first_k: int = 1024):
    """The nucleus of each row of probs [M, V]: the smallest set of most probable tokens
    whose mass reaches top_p, as groups of rows ``(rows [M] bool, p [m, C], ids [m, C])``:
    candidate probabilities (zero outside the nucleus, not renormalised) and their token
    ids in ascending order (None: the column is the token id).

    A trained model's nucleus is usually small, so each row first tries its top ``first_k``
    tokens (a partial selection, much cheaper than sorting the vocabulary, and the draw
    then touches only those); rows whose top ``first_k`` mass falls short of top_p (flat
    distributions) take the full sort. The kept set is the same either way, and the choice
    depends on the row alone, so a row's draw does not depend on the other rows.
    """
    if top_p >= 1.0:
        return [(torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device), probs, None)]
    k = min(first_k, probs.shape[-1])
    # [M]: the nucleus reaches past the first k tokens. Certain without the topk when even k
    # copies of the row's largest probability fall short (flat rows).
    short = probs.amax(-1) * k < top_p
    if not short.all():
        head_p, head_ids = probs[~short].topk(k, dim=-1)  # [M', k], descending
        head_short = head_p.sum(-1) < top_p
        short[~short.clone()] = head_short
        head_p, head_ids = head_p[~head_short], head_ids[~head_short]
    groups = []
    # Candidates go back to token-id order: the draw must not depend on how topk/sort order
    # tied probabilities, which can change with the number of rows.
    if not short.all():
        ids, order = head_ids.sort(dim=-1)
        groups.append((~short, _keep_prefix(head_p, top_p).gather(-1, order), ids))
    if short.any():
        groups.append((short, _nucleus_by_buckets(probs[short], top_p), None))
    return groups


def _nucleus_by_buckets(probs: torch.Tensor, top_p: float, mantissa_bits: int = 5) -> torch.Tensor:
    """The nucleus of each row of probs [m, V] (float64) as probabilities [m, V], zero
    outside it, without sorting the vocabulary: what sorting descending and keeping every
    token whose preceding mass is below top_p keeps.

    The float32 bit pattern of a probability, shifted right, is a bucket index that never
    decreases as the probability grows (2^mantissa_bits buckets per power of two). Bucket
    masses summed from the top find the boundary bucket, where the running mass first
    reaches top_p: buckets above it are kept whole, buckets below dropped, and only the
    boundary bucket's tokens (a few hundred even for a flat row) are ordered, by topk.
    """
    m, V = probs.shape
    shift = 23 - mantissa_bits
    key = (probs.float().view(torch.int32) >> shift).long()  # [m, V], monotone in p
    n_keys = (0x7F800000 >> shift) + 1  # up to +inf's bucket
    mass = torch.zeros(m, n_keys, dtype=probs.dtype, device=probs.device).scatter_add_(1, key, probs)
    above = mass.flip(-1).cumsum(-1).flip(-1) - mass  # [m, n_keys]: mass of the higher buckets
    reaches = (above + mass >= top_p) & (mass > 0)
    # The boundary: the highest bucket where the running mass reaches top_p (none: keep all).
    boundary = torch.where(reaches.any(-1), n_keys - 1 - reaches.flip(-1).int().argmax(-1), -1)  # [m]
    keep = key > boundary[:, None]
    in_boundary = key == boundary[:, None]
    count = int(in_boundary.sum(-1).max()) if m else 0
    if count:
        vals, ids = probs.masked_fill(~in_boundary, -1.0).topk(count, dim=-1)  # [m, count], descending
        before = above.gather(1, boundary.clamp(min=0)[:, None]) + vals.clamp(min=0).cumsum(-1) - vals.clamp(min=0)
        keep.scatter_(1, ids, (vals >= 0) & (before < top_p) | keep.gather(1, ids))
    return probs * keep


def _draw(weights: torch.Tensor, generator) -> torch.Tensor:
    """One sample per row of weights [m, C] (float64, need not sum to 1) by an exponential
    race, argmax w / E with E ~ Exp(1): BD3-LM's float64 Gumbel-max draw."""
    u = torch.rand(weights.shape, dtype=torch.float64, device=weights.device, generator=generator)
    race = u.clamp_min_(1e-300).log_().neg_()  # E = -log(u), in place: these rows span the vocabulary
    return torch.div(weights, race, out=race).argmax(-1)


def _sample_tokens(probs: torch.Tensor, top_p: float, rows: torch.Tensor, generators) -> torch.Tensor:
    """Nucleus sampling of one token per row of probs [M, V]; rows [M] = the batch row of each
    (a list of per-row generators draws each batch row's positions with its own generator)."""
    tokens = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    for sel, p, ids in _nucleus_groups(probs, top_p):
        if isinstance(generators, list):
            choice = torch.empty(p.shape[0], dtype=torch.int64, device=p.device)
            group_rows = rows[sel]
            for b in group_rows.unique().tolist():
                mine = group_rows == b
                choice[mine] = _draw(p[mine], generators[b])
        else:
            choice = _draw(p, generators)
        tokens[sel] = choice if ids is None else ids.gather(-1, choice[:, None])[:, 0]
    return tokens


class _TokenDrawer:
    """Samples tokens at chosen positions from raw logits, with BD3-LM's conventions."""

    def __init__(self, mask_id: int, temperature: float, top_p: float, generators):
        self.mask_id, self.temperature, self.top_p, self.generators = mask_id, temperature, top_p, generators

    # Rows of logits handled at once: the float64 probabilities and the nucleus sort of a
    # whole batch-64 global step (16k rows x 50k tokens) would need tens of GB.
    chunk_elements = 1 << 25

    def __call__(self, logits: torch.Tensor, where: torch.Tensor):
        """logits [M, V] at the M true positions of where [B, W] (row-major) -> tokens [M],
        confidence [M]."""
        rows = where.nonzero()[:, 0]  # [M], ascending: positions of row 0 first
        tokens = torch.empty(rows.shape[0], dtype=torch.int64, device=logits.device)
        confidence = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
        for start, end in self._chunks(rows, logits.shape[-1]):
            lg = logits[start:end].float().clone()  # [m, V]
            lg[:, self.mask_id] = float("-inf")  # SUBS: the mask is never a prediction
            if self.temperature == 0:
                tok = lg.argmax(-1)
            else:
                scaled = lg.double() if self.temperature == 1 else lg.double() / self.temperature
                probs = torch.softmax(scaled, dim=-1)
                del scaled
                tok = _sample_tokens(probs, self.top_p, rows[start:end], self.generators)
                del probs
            tokens[start:end] = tok
            # The model's probability of the token (temperature 1). A full softmax, not a
            # log-sum-exp: torch may split a reduction over the vocabulary across threads
            # when there are few rows, which would make a row's value depend on the others.
            confidence[start:end] = torch.softmax(lg, dim=-1).gather(-1, tok[:, None])[:, 0]
        return tokens, confidence

    def _chunks(self, rows: torch.Tensor, vocab: int):
        """Slices [start, end) of the M rows, about chunk_elements / V rows each. With
        per-row generators a batch row's positions are never split (they draw from their
        own generator in order), so a row's draws do not depend on the other rows."""
        M, per_chunk = rows.shape[0], max(1, self.chunk_elements // max(vocab, 1))
        if not isinstance(self.generators, list):
            return [(s, min(s + per_chunk, M)) for s in range(0, M, per_chunk)]
        bounds = torch.cat([torch.tensor([0], device=rows.device), (rows[1:] != rows[:-1]).nonzero()[:, 0] + 1,
                            torch.tensor([M], device=rows.device)]).tolist()  # batch-row boundaries
        chunks, start = [], 0
        for i in range(1, len(bounds)):  # grow a chunk by whole batch rows while it fits
            if bounds[i] - start > per_chunk and bounds[i - 1] > start:
                chunks.append((start, bounds[i - 1]))
                start = bounds[i - 1]
        if start < M:
            chunks.append((start, M))
        return chunks


def _random_pick(candidates: torch.Tensor, counts: torch.Tensor, generators, k_max: int) -> torch.Tensor:
    """Per row b, counts[b] positions of candidates [B, W] chosen uniformly -> [B, W] bool."""
    B, W = candidates.shape
    if isinstance(generators, list):
        scores = torch.stack([torch.rand(W, generator=g, device=candidates.device) for g in generators])
    else:
        scores = torch.rand((B, W), generator=generators, device=candidates.device)
    return _top_by_score(scores.masked_fill(~candidates, -1.0), candidates, counts, k_max)


def _top_by_score(scores: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor, k_max: int) -> torch.Tensor:
    """Per row, the counts[b] candidates with the highest scores -> [B, W] bool.

    ``k_max`` is a host-side bound on counts (not read from the device: no synchronisation)."""
    chosen = torch.zeros_like(candidates)
    k = min(k_max, candidates.shape[1])
    if k <= 0:
        return chosen
    scores = scores.masked_fill(~candidates, float("-inf"))
    top = scores.topk(k, dim=-1).indices  # [B, k]
    keep = torch.arange(k, device=scores.device)[None, :] < counts[:, None]
    chosen.scatter_(1, top, keep)
    return chosen & candidates


# ---------------------------------------------------------------------------------------
# The sampler


class DiDSampler:
    """Reusable draft-then-refine sampler for any model with the BlockDiffusionLM surface:

    - ``model.decode(block_tokens, cache) -> logits [B, n, V]`` (cache unchanged)
    - ``model.commit(block_tokens, cache, block_size=None)``
    - ``model.new_kv_cache(batch_size, max_len=None)`` with ``.lengths``
    - ``model(tokens) -> logits [B, S, V]`` (global bidirectional forward)
    - ``model.mask_id`` (or ``SamplerConfig.mask_id``), ``model.config.model_length``
    """

    def __init__(self, model, config: SamplerConfig | None = None, **overrides):
        self.model = model
        self.config = config if config is not None else SamplerConfig(**overrides)
        if config is not None and overrides:
            raise UserError("pass either a SamplerConfig or keyword overrides, not both")
        self.mask_id = self.config.mask_id if self.config.mask_id is not None else int(model.mask_id)
        self.model_length = int(model.config.model_length)
        # Models that state their vocabulary get their token ids checked against it.
        self.vocab_size = getattr(model.config, "vocab_size", None)
        if self.vocab_size is not None:
            self.vocab_size = int(self.vocab_size)
            if not 0 <= self.mask_id < self.vocab_size:
                raise UserError(f"mask_id {self.mask_id} is outside the model's vocabulary [0, {self.vocab_size})")
            if self.config.eos_id is not None and self.config.eos_id >= self.vocab_size:
                raise UserError(f"eos_id {self.config.eos_id} is outside the model's vocabulary "
                                f"[0, {self.vocab_size})")
        if self.config.eos_id is not None and self.config.eos_id == self.mask_id:
            raise UserError(f"eos_id {self.config.eos_id} is the mask token's id")

    # -- public -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, batch_size: int = 1, prompt=None, generator=None, tokenizer=None,
                 progress: bool = False) -> GenerationResult:
        cfg = self.config
        device = next(self.model.parameters()).device if hasattr(self.model, "parameters") else torch.device("cpu")
        _check_int("batch_size", batch_size, 1)
        prompt = self._check_prompt(prompt, batch_size, device)
        batch_size = prompt.shape[0] if prompt is not None else batch_size
        P = 0 if prompt is None else prompt.shape[1]
        length = cfg.length if cfg.length is not None else self.model_length
        if length <= P:
            raise UserError(f"length {length} leaves no room to generate after a prompt of {P} tokens")
        # Everything the stages will need is checked now, not after minutes of drafting.
        if cfg.method == "mdlm":
            self._check_global(length)
        self._check_stages(cfg.stages, length)
        gens = _row_generators(generator, batch_size)
        drawer = _TokenDrawer(self.mask_id, cfg.temperature, cfg.top_p, gens)

        tokens = torch.full((batch_size, length), self.mask_id, dtype=torch.int64, device=device)
        confidence = torch.full((batch_size, length), float("inf"), dtype=torch.float32, device=device)
        if P:
            tokens[:, :P] = prompt
        lengths = torch.full((batch_size,), length, dtype=torch.int64, device=device)
        nfe, seconds, remasked = {}, {}, {}

        t0 = time.perf_counter()
        if cfg.method == "mdlm":
            nfe["draft"] = {"forward": 0}
            targets = tokens == self.mask_id
            self._fill(tokens, confidence, targets, lambda x, **kw: self.model(x, **kw), drawer, nfe["draft"], "forward",
                       order="random", steps=cfg.mdlm_steps, gens=gens, progress=progress)
        else:
            nfe["draft"] = {"decode": 0, "commit": 0}
            self._draft(tokens, confidence, P, lengths, drawer, gens, nfe["draft"], progress)
        seconds["draft"] = time.perf_counter() - t0
        draft = GenerationResult(tokens, tokens.clone(), confidence, confidence.clone(), remasked, nfe, seconds,
                                 lengths, P)
        return self._run_stages(draft, cfg.stages, gens, drawer, tokenizer, progress)

    @torch.no_grad()
    def refine(self, result: GenerationResult, stages=None, generator=None, tokenizer=None,
               progress: bool = False) -> GenerationResult:
        """Run refinement stages (default: the config's) on a finished generation, from its
        tokens and snapshot confidences; ``result`` is left as it was.

        The way to compare refinement settings on the same drafts: draft once with
        ``stages=[]``, then refine copies. The new result keeps the draft fields and the
        earlier stages' counts and times; its new stages are numbered after them.
        ``generate(..., stages=S)`` equals ``refine(generate(..., stages=[]), S)`` when the
        same generator objects are passed on (they carry the draws' state).
        """
        stages = self.config.stages if stages is None else [
            _as_stage(s) for s in stages]
        tokens = result.tokens
        if tokens.dim() != 2 or tokens.shape != result.confidence.shape:
            raise UserError("result must hold tokens and confidence of one shape [B, length]")
        self._check_stages(stages, tokens.shape[1])
        gens = _row_generators(generator, tokens.shape[0])
        drawer = _TokenDrawer(self.mask_id, self.config.temperature, self.config.top_p, gens)
        start = GenerationResult(tokens.clone(), result.draft_tokens, result.confidence.clone(),
                                 result.draft_confidence, dict(result.remasked),
                                 {k: dict(v) for k, v in result.nfe.items()}, dict(result.seconds),
                                 result.lengths, result.prompt_length)
        return self._run_stages(start, stages, gens, drawer, tokenizer, progress)

    def _run_stages(self, result, stages, gens, drawer, tokenizer, progress):
        """Apply stages to result.tokens / result.confidence in place, recording each stage."""
        tokens, confidence, P, lengths = result.tokens, result.confidence, result.prompt_length, result.lengths
        done = sum(1 for name in result.nfe if name.startswith("refine_"))
        for i, stage in enumerate(stages, start=done + 1):
            name = f"refine_{i}"
            t0 = time.perf_counter()
            result.nfe[name] = {}
            result.remasked[name] = self._remask(tokens, confidence, P, lengths, stage, gens, result.nfe[name])
            self._refine(tokens, confidence, P, stage, drawer, gens, result.nfe[name], progress)
            result.seconds[name] = time.perf_counter() - t0
        if tokenizer is not None:
            result.text = [tokenizer.decode(row[: int(n)].tolist()) for row, n in zip(tokens, lengths)]
            result.draft_text = [tokenizer.decode(row[: int(n)].tolist())
                                 for row, n in zip(result.draft_tokens, lengths)]
        return result

    __call__ = generate

    # -- checks -------------------------------------------------------------------------

    def _check_prompt(self, prompt, batch_size, device):
        if prompt is None:
            return None
        prompt = torch.as_tensor(prompt, device=device)
        # Float ids would be truncated silently by a cast: refuse them (and bools). An empty
        # prompt ([] becomes a float tensor) holds no ids to truncate.
        if prompt.numel() and (prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool):
            raise UserError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
        prompt = prompt.to(torch.int64)
        if prompt.dim() == 1:
            prompt = prompt[None]
        # A [R, P] prompt sets the batch (batch_size left at 1) or is one row shared by every row.
        if prompt.dim() != 2 or prompt.shape[0] not in (1, batch_size) and batch_size != 1:
            raise UserError(f"prompt must be [P] or [batch_size={batch_size}, P] token ids, got {tuple(prompt.shape)}")
        if prompt.shape[0] == 1:
            prompt = prompt.expand(batch_size, -1)
        vocab = self.vocab_size if self.vocab_size is not None else self.mask_id + 1
        if prompt.numel() and (prompt.min() < 0 or prompt.max() >= vocab or (prompt == self.mask_id).any()):
            raise UserError(f"prompt token ids must be in [0, {vocab}) and not the mask id {self.mask_id}")
        return prompt.contiguous()

    def _check_stages(self, stages, length):
        for i, stage in enumerate(stages, start=1):
            if stage.block_size is None or stage.block_size >= length:
                self._check_global(length)
                if stage.reuse_context and not hasattr(self.model, "refine_forward"):
                    raise UserError("reuse_context needs a model with refine_forward (did_engine's BlockDiffusionLM)")
            elif stage.reuse_context:
                raise UserError(f"reuse_context applies to global refine stages; stage {i}'s block size "
                                f"{stage.block_size} is shorter than the sequence ({length})")

    def _check_global(self, length):
        if length > self.model_length:
            raise UserError(f"a global block over {length} tokens exceeds the model's context of "
                             f"{self.model_length}; use a refine block_size <= {self.model_length}")

    # -- the unmasking loop ---------------------------------------------------------------

    def _fill(self, x, conf, targets, logits_fn, drawer, counter, kind, order, steps, gens, progress=False,
              per_step=None, threshold=None):
        """Unmask every position of targets [B, W] (all mask tokens) in x [B, W], in place.

        Each model call (logits_fn(x, **kwargs) -> [B, W, V], or [M, V] with logit_positions,
        counted in counter[kind]) fills, per row:
        per_step positions (fixed count), or every candidate above threshold (at least one),
        or ceil(remaining / calls left) when a step budget `steps` is given, or 1.
        order "random" picks the positions uniformly; "confidence" picks the most probable draws.
        """
        remaining = targets.clone()
        calls = 0
        while remaining.any():
            calls += 1
            left = remaining.sum(-1)  # [B]
            # counts per row, and k_max: a bound on them known without reading the device
            if steps is not None:
                counts = torch.where(left > 0, -(-left // max(steps - calls + 1, 1)), left)
                k_max = -(-x.shape[1] // max(steps - calls + 1, 1))
            elif per_step is not None:
                counts, k_max = left.clamp(max=per_step), per_step
            else:
                counts, k_max = left.clamp(max=1), 1
            if order == "random":
                # The positions are chosen before the call: logits are needed there only.
                chosen = _random_pick(remaining, counts, gens, k_max)
                tok, cf = drawer(self._logits(logits_fn, x, chosen), chosen)
                counter[kind] += 1
            else:
                tok_all, cf_all = drawer(self._logits(logits_fn, x, remaining), remaining)
                counter[kind] += 1
                score = torch.full(remaining.shape, float("-inf"), device=x.device)
                score[remaining] = cf_all.float()
                if threshold is not None:
                    best = _top_by_score(score, remaining, left.clamp(max=1), 1)
                    chosen = (remaining & (score >= threshold)) | best
                else:
                    chosen = _top_by_score(score, remaining, counts, k_max)
                pick = chosen[remaining]  # which of the drawn positions are kept
                tok, cf = tok_all[pick], cf_all[pick]
            x[chosen] = tok
            conf[chosen] = cf
            remaining &= ~chosen
        return calls

    def _logits(self, call, x, need):
        """Logits [M, V] at the true positions of need [B, W] from call(x, **kwargs): models
        that support it (``supports_logit_positions``) compute only those rows."""
        if getattr(self.model, "supports_logit_positions", False):
            return call(x, logit_positions=need)
        return call(x)[need]

    # -- draft ----------------------------------------------------------------------------

    def _draft(self, tokens, confidence, P, lengths, drawer, gens, counter, progress):
        cfg, model = self.config, self.model
        bs, (B, L) = cfg.block_size, tokens.shape
        cache = _CachedBlocks(model, B, max(self.model_length - bs, bs), counter)
        first = P // bs  # blocks made only of prompt tokens are committed as the prefill
        if first:
            cache.prefill(tokens[:, : first * bs], bs)
        done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        blocks = range(first, -(-L // bs))
        if progress:
            from tqdm.auto import tqdm

            blocks = tqdm(blocks, desc="draft", unit="block")
        for j in blocks:
            s, e = j * bs, min((j + 1) * bs, L)
            x, c = tokens[:, s:e], confidence[:, s:e]  # views: filled in place
            if done.any():
                x[done] = cfg.eos_id
            targets = (x == self.mask_id) & ~done[:, None]
            strategy_args = dict(order="random") if cfg.strategy == "first_hitting" else (
                dict(order="confidence", per_step=cfg.tokens_per_step) if cfg.strategy == "topk" else
                dict(order="confidence", threshold=cfg.threshold))
            self._fill(x, c, targets, cache.decode, drawer, counter, "decode", steps=None, gens=gens, **strategy_args)
            if cfg.stop_at_eos:
                self._stop_rows(tokens, s, e, P, lengths, done)
                if bool(done.all()):
                    tokens[:, e:] = cfg.eos_id
                    break
            if e < L:
                cache.commit(x)

    def _stop_rows(self, tokens, s, e, P, lengths, done):
        """Rows whose block [s, e) produced an EOS end there; the rest of the row becomes EOS."""
        eos = self.config.eos_id
        is_eos = tokens[:, max(s, P):e] == eos
        newly = is_eos.any(-1) & ~done
        for b in newly.nonzero()[:, 0].tolist():
            stop = max(s, P) + int(is_eos[b].nonzero()[0, 0])
            lengths[b] = stop + 1
            tokens[b, stop + 1:] = eos
        done |= newly

    # -- refinement -----------------------------------------------------------------------

    def _eligible(self, tokens, P, lengths):
        """Generated positions that may be remasked: after the prompt, before a row's EOS."""
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        end = lengths - (1 if self.config.stop_at_eos else 0)  # a stop EOS stays put
        end = torch.where(lengths < tokens.shape[1], end, lengths)
        return (pos[None, :] >= P) & (pos[None, :] < end[:, None])

    def _remask(self, tokens, confidence, P, lengths, stage, gens, counter):
        eligible = self._eligible(tokens, P, lengths)
        counts = torch.floor(eligible.sum(-1).double() * stage.remask_ratio + 0.5).to(torch.int64)  # [B]
        policy = self.config.remask_policy
        if policy == "snapshot":
            ranking = confidence
        elif policy == "posthoc":
            # Re-score the finished sequence with one global forward.
            counter["rescore"] = counter.get("rescore", 0) + 1
            lg = self._logits(lambda x, **kw: self.model(x, **kw), tokens, eligible).float()  # [M, V]
            lg[:, self.mask_id] = float("-inf")
            ranking = torch.full(tokens.shape, float("inf"), device=tokens.device)  # never chosen: not eligible
            ranking[eligible] = torch.softmax(lg, -1).gather(-1, tokens[eligible][:, None])[:, 0]
        else:
            if isinstance(gens, list):
                ranking = torch.stack([torch.rand(tokens.shape[1], generator=g, device=tokens.device) for g in gens])
            else:
                ranking = torch.rand(tokens.shape, generator=gens, device=tokens.device)
        ranking = ranking.to(torch.float32).contiguous()
        # The output width: a bound on every row's count from host-side sizes (a row has at
        # most L - P eligible tokens), not counts.max(), which would synchronise.
        max_k = math.floor((tokens.shape[1] - P) * stage.remask_ratio + 0.5)
        idx = ops.snapshot_remask(tokens, ranking, counts, eligible, self.mask_id, max_k=max_k)
        if ranking.data_ptr() != confidence.data_ptr():
            confidence[tokens == self.mask_id] = float("inf")
        return idx

    def _refine(self, tokens, confidence, P, stage, drawer, gens, counter, progress):
        B, L = tokens.shape
        bs = stage.block_size
        if bs is None or bs >= L:  # global
            self._check_global(L)  # (generate/refine checked it up front; a host-side compare)
            counter.setdefault("forward", 0)
            targets = tokens == self.mask_id
            if stage.reuse_context:  # it counts its full and partial forwards itself
                logits_fn, fill_counter, kind = _ContextReuse(self.model, targets, counter), {"calls": 0}, "calls"
            else:
                logits_fn, fill_counter, kind = (lambda x, **kw: self.model(x, **kw)), counter, "forward"
            self._fill(tokens, confidence, targets, logits_fn, drawer, fill_counter, kind, order=stage.order,
                       steps=stage.steps, gens=gens)
            return
        cache = _CachedBlocks(self.model, B, max(self.model_length - bs, bs), counter)
        first = P // bs
        if first:
            cache.prefill(tokens[:, : first * bs], bs)
        for j in range(first, -(-L // bs)):
            s, e = j * bs, min((j + 1) * bs, L)
            x, c = tokens[:, s:e], confidence[:, s:e]
            targets = x == self.mask_id
            if targets.any():
                self._fill(x, c, targets, cache.decode, drawer, counter, "decode",
                           order=stage.order, steps=stage.steps, gens=gens)
            if e < L:
                cache.commit(x)


class _ContextReuse:
    """The logits of a global refine stage with reuse_context: the first call is a full
    global forward that stores every layer's K/V; later calls re-run only the stage's
    remasked positions against them (counted as "partial" forwards)."""

    def __init__(self, model, targets, counter):
        B, L = targets.shape
        self.model, self.counter = model, counter
        self.context = model.new_kv_cache(B, max_len=L)
        counts = targets.sum(-1)  # [B]
        r = int(counts.max())
        # Each row's remasked positions, ascending, then (padding) other positions whose
        # queries are computed but whose K/V are never written: a row's result does not
        # depend on how many positions the other rows remasked.
        self.positions = torch.sort((~targets).to(torch.int8), dim=1, stable=True).indices[:, :r]  # [B, r]
        self.write = torch.arange(r, device=targets.device)[None, :] < counts[:, None]  # [B, r]
        self.started = False
        counter.setdefault("partial", 0)

    def __call__(self, x, logit_positions=None):
        if not self.started:
            self.started = True
            self.counter["forward"] += 1
            return self.model.refine_forward(x, self.context, logit_positions=logit_positions)
        self.counter["partial"] += 1
        need = None if logit_positions is None else logit_positions.gather(1, self.positions) & self.write
        return self.model.refine_forward(x, self.context, self.positions, write=self.write, logit_positions=need)


class _CachedBlocks:
    """A KV cache driven block by block, counting every forward in counter.

    A finished block is not committed at once: with a model that offers
    ``commit_and_decode`` the commit rides along with the next block's first decode call
    (one forward, counted as that decode), which saves one weight read per block where
    decoding is weight-read bound. Other models get a separate ``commit`` (counted as one).
    """

    def __init__(self, model, batch_size, max_len, counter):
        self.model, self.counter = model, counter
        self.cache = model.new_kv_cache(batch_size, max_len=max_len)
        self.fused = bool(getattr(model, "supports_commit_and_decode", False))
        self.pending = None  # a finished block not yet in the cache
        counter.setdefault("decode", 0)
        counter.setdefault("commit", 0)

    def prefill(self, tokens, block_size):
        """Commit whole prompt blocks (block-causal prefill; did_engine's models run it as one
        forward into an empty cache and say how many forwards they ran)."""
        forwards = self.model.commit(tokens, self.cache, block_size=block_size)
        self.counter["commit"] += forwards if isinstance(forwards, int) else tokens.shape[1] // block_size

    def commit(self, block):
        if not self.fused:
            self._commit_now(block)
            return
        if self.pending is not None:  # the previous block had no decode call to ride on
            self._commit_now(self.pending)
        self.pending = block.clone()

    def _commit_now(self, block):
        self.model.commit(block, self.cache)
        self.counter["commit"] += 1

    def decode(self, block, **kwargs):
        if self.pending is None:
            return self.model.decode(block, self.cache, **kwargs)
        pending, self.pending = self.pending, None
        return self.model.commit_and_decode(pending, block, self.cache, **kwargs)


def generate(model, batch_size: int = 1, prompt=None, *, generator=None, tokenizer=None, progress: bool = False,
             config: SamplerConfig | None = None, **options) -> GenerationResult:
    """Generate with DiD (or a baseline). ``options`` are SamplerConfig fields, e.g.::

        did_engine.generate(model, 8, length=256, block_size=4, strategy="topk", tokens_per_step=2,
                            stages=[(None, 0.25, 8)], remask_policy="snapshot", top_p=0.9,
                            generator=torch.Generator().manual_seed(0))
    """
    if config is not None and options:
        raise UserError("pass either config= or SamplerConfig options, not both")
    sampler = DiDSampler(model, config or SamplerConfig(**options))
    return sampler.generate(batch_size, prompt=prompt, generator=generator, tokenizer=tokenizer, progress=progress)
