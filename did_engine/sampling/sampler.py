"""The Diffusion-in-Diffusion sampler: a block-diffusion draft, then global refinement.

Draft (stage "draft"): the sequence is generated left to right in blocks of
``block_size`` tokens with an exact KV cache. Inside a block, masked positions are
unmasked over several model calls (one ``model.decode`` each) by one of three rules:

    first_hitting   one position per call, chosen uniformly (BD3-LM; NFE = tokens)
    topk            the ``tokens_per_step`` positions whose sampled token is most probable
    threshold       every position whose sampled token has probability >= ``threshold``,
                    and at least the ``min_tokens_per_step`` most probable ones (default 1)

What the peers call these rules:

    BD3-LM first-hitting sampler                 first_hitting
    SDAR / TraDo  low_confidence_static          topk, tokens_per_step = block_size / steps
    SDAR / TraDo  low_confidence_dynamic         threshold, min_tokens_per_step = block_size / steps
                  (threshold ``confidence_threshold``)
    Fast-dLLM v2  threshold decoding             threshold, min_tokens_per_step = 1
                  (threshold 0.9 by default)

(SDAR also has ``sequential``, left to right one position per call, which no confidence
rule here reproduces. SDAR and Fast-dLLM v2 compare with ``>``, we with ``>=``: they
differ only when a probability equals the threshold exactly.)

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

The settings and the result are in config.py; drawing tokens (SUBS, temperature, nucleus,
the float64 race) and choosing positions in drawing.py; this file runs the stages.
"""

from __future__ import annotations

import math
import time

import torch

from did_engine import ops
from did_engine.diffusion import subs_logits
from did_engine.errors import UserError
from did_engine.sampling.config import GenerationResult, RefineStage, SamplerConfig, as_refine_stage, check_int
from did_engine.sampling.drawing import TokenDrawer, random_pick, row_generators, top_by_score


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
        check_int("batch_size", batch_size, 1)
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
        gens = row_generators(generator, batch_size)
        drawer = TokenDrawer(self.mask_id, cfg.temperature, cfg.top_p, gens)

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
    def refine(self, result: GenerationResult, stages: list[RefineStage] | None = None, generator=None,
               tokenizer=None, progress: bool = False) -> GenerationResult:
        """Run refinement stages (default: the config's) on a finished generation, from its
        tokens and snapshot confidences; ``result`` is left as it was.

        The way to compare refinement settings on the same drafts: draft once with
        ``stages=[]``, then refine copies. The new result keeps the draft fields and the
        earlier stages' counts and times; its new stages are numbered after them.
        ``generate(..., stages=S)`` equals ``refine(generate(..., stages=[]), S)`` when the
        same generator objects are passed on (they carry the draws' state).
        """
        stages = self.config.stages if stages is None else [as_refine_stage(s) for s in stages]
        tokens = result.tokens
        if tokens.dim() != 2 or tokens.shape != result.confidence.shape:
            raise UserError("result must hold tokens and confidence of one shape [B, length]")
        self._check_stages(stages, tokens.shape[1])
        gens = row_generators(generator, tokens.shape[0])
        drawer = TokenDrawer(self.mask_id, self.config.temperature, self.config.top_p, gens)
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

    def _cache_capacity(self, length: int, block_size: int) -> int:
        """Committed tokens a KV cache must hold for a sequence of ``length`` in blocks of
        ``block_size``: every block but the last, and no more than the model's context
        leaves beside the active block (a longer generation slides the window, as BD3-LM
        does). Sizing it by the generation, not the context, keeps a short generation of a
        long-context model from allocating the whole context per row."""
        committed = (-(-length // block_size) - 1) * block_size
        return max(min(committed, self.model_length - block_size), block_size)

    # -- the unmasking loop ---------------------------------------------------------------

    def _fill(self, x, conf, targets, logits_fn, drawer, counter, kind, order, steps, gens, progress=False,
              per_step=None, threshold=None):
        """Unmask every position of targets [B, W] (all mask tokens) in x [B, W], in place.

        Each model call (logits_fn(x, **kwargs) -> [B, W, V], or [M, V] with logit_positions,
        counted in counter[kind]) fills, per row:
        per_step positions (fixed count); with a threshold, every candidate at or above it,
        and at least the per_step (default 1) most probable; ceil(remaining / calls left)
        when a step budget `steps` is given; or 1.
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
                chosen = random_pick(remaining, counts, gens, k_max)
                tok, cf = drawer(self._logits(logits_fn, x, chosen), chosen)
                counter[kind] += 1
            else:
                tok_all, cf_all = drawer(self._logits(logits_fn, x, remaining), remaining)
                counter[kind] += 1
                score = torch.full(remaining.shape, float("-inf"), device=x.device)
                score[remaining] = cf_all.float()
                if threshold is not None:
                    # The per_step most probable are a subset of those above the threshold
                    # whenever at least per_step are: the floor only acts below it.
                    best = top_by_score(score, remaining, counts, k_max)
                    chosen = (remaining & (score >= threshold)) | best
                else:
                    chosen = top_by_score(score, remaining, counts, k_max)
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
        cache = _CachedBlocks(model, B, self._cache_capacity(L, bs), counter)
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
                dict(order="confidence", threshold=cfg.threshold, per_step=cfg.min_tokens_per_step))
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
            logits = self._logits(lambda x, **kw: self.model(x, **kw), tokens, eligible)  # [M, V]
            lg = subs_logits(logits.float(), self.mask_id)  # float32, as the draws' confidences
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
        cache = _CachedBlocks(self.model, B, self._cache_capacity(L, bs), counter)
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
