"""DiDSampler: unmask order, snapshot confidences, NFE accounting, remasking, reproducibility."""

from __future__ import annotations

import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from did_engine.modeling import BlockDiffusionLM, ModelConfig
from did_engine.modeling.llama import LlamaBlockConfig, LlamaBlockDiffusionLM
from did_engine.errors import UserError
from did_engine.sampling import DiDSampler, RefineStage, SamplerConfig, generate
from support.rowwise import RowByRow
from support.uncached import UncachedModel


class ToyDenoiser(torch.nn.Module):
    """Logits depend only on the absolute position: logits[b, p] = table[p] (known in advance).

    It offers the BlockDiffusionLM surface and logs every call and the masked positions it saw.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # [L, V]
        self.mask_id = table.shape[1] - 1
        self.config = SimpleNamespace(model_length=table.shape[0])
        self.calls = Counter()
        self.seen_masks = []  # per decode call: absolute positions still masked
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the sampler a device

    def new_kv_cache(self, batch_size, max_len=None):
        return SimpleNamespace(lengths=torch.zeros(batch_size, dtype=torch.int64))

    def decode(self, block, cache):
        self.calls["decode"] += 1
        pos = cache.lengths[:, None] + torch.arange(block.shape[1])
        self.seen_masks.append(sorted(pos[block == self.mask_id].tolist()))
        return self.table[pos]

    def commit(self, block, cache, block_size=None):
        self.calls["commit"] += 1
        cache.lengths += block.shape[1]

    def forward(self, tokens, block_size=None):
        self.calls["forward"] += 1
        return self.table[: tokens.shape[1]].expand(tokens.shape[0], -1, -1)


def subs_probs(table: torch.Tensor) -> torch.Tensor:
    """Independent SUBS: softmax over everything but the mask (last) column."""
    probs = torch.softmax(table[:, :-1].double(), -1)
    return torch.cat([probs, torch.zeros(table.shape[0], 1, dtype=torch.float64)], -1)


def random_table(L=12, V=9, seed=0):
    return torch.randn(L, V, generator=torch.Generator().manual_seed(seed)) * 2


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=29, model_length=32, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=2, dropout=0.0)
    model = BlockDiffusionLM(ModelConfig(**{**cfg, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    return model.eval()


def tiny_llama(shift: bool, seed=0):
    """A LlamaBlockDiffusionLM (Qwen3 layout: q/k norm, grouped-query heads) with random
    weights large enough to give peaked, row-dependent logits."""
    torch.manual_seed(seed)
    model = LlamaBlockDiffusionLM(LlamaBlockConfig(
        vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, qk_norm=True, model_length=64, mask_id=52, block_size=4,
        logit_shift=shift))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    return model.eval()


# -- the draft against a hand computation -----------------------------------------------------


def test_greedy_topk_unmask_order_and_confidence_match_hand_computation():
    table = random_table()
    toy = ToyDenoiser(table)
    result = generate(toy, 1, length=12, block_size=4, strategy="topk", tokens_per_step=1, temperature=0)
    probs = subs_probs(table)
    best_p, best_tok = probs.max(-1)
    # Within each block, positions are unmasked from the most to the least confident.
    expected_seen = []
    for start in range(0, 12, 4):
        order = sorted(range(start, start + 4), key=lambda p: -float(best_p[p]))
        for i in range(4):
            expected_seen.append(sorted(order[i:]))
    assert toy.seen_masks == expected_seen
    assert result.tokens[0].tolist() == best_tok.tolist()
    torch.testing.assert_close(result.confidence[0].double(), best_p, atol=1e-6, rtol=1e-6)


def test_first_hitting_makes_one_call_per_generated_token():
    toy = ToyDenoiser(random_table(L=16))
    prompt = torch.tensor([0, 1, 2, 3, 4, 5])
    result = generate(toy, 2, prompt=prompt, length=16, block_size=4, generator=torch.Generator().manual_seed(0))
    assert toy.calls["decode"] == 10 == result.nfe["draft"]["decode"]
    # One prefill commit (the prompt's full block), then every block but the last.
    assert toy.calls["commit"] == result.nfe["draft"]["commit"] == 1 + 2
    assert all(len(seen) >= 1 for seen in toy.seen_masks)
    assert result.tokens[:, :6].tolist() == [prompt.tolist()] * 2
    assert (result.tokens != toy.mask_id).all()


def test_threshold_commits_every_confident_position_at_once():
    table = torch.full((8, 5), -10.0)
    table[:, 0] = 10.0  # every position is near-certain
    toy = ToyDenoiser(table)
    result = generate(toy, 1, length=8, block_size=4, strategy="threshold", threshold=0.9, temperature=0)
    assert result.nfe["draft"]["decode"] == 2  # one call per block
    assert toy.seen_masks == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("floor,expected_seen", [
    # Fast-dLLM v2's rule: everything above the threshold, else the single most confident.
    (1, [[0, 1, 2, 3, 4, 5], [1, 3, 5], [1, 3], [3], [6, 7, 8, 9, 10, 11], [6, 8, 9, 10, 11], [8, 9, 10, 11],
         [8, 9, 10], [8, 10], [10]]),
    # SDAR's low_confidence_dynamic with k = 2: everything above the threshold when that is
    # at least 2 positions, else the 2 most confident.
    (2, [[0, 1, 2, 3, 4, 5], [1, 3, 5], [3], [6, 7, 8, 9, 10, 11], [8, 9, 10, 11], [8, 10]]),
    (3, [[0, 1, 2, 3, 4, 5], [1, 3, 5], [6, 7, 8, 9, 10, 11], [8, 9, 10]]),
])
def test_threshold_with_a_floor_of_tokens_per_step_matches_hand_computation(floor, expected_seen):
    """Greedy draws from a table whose top probabilities are, by position,
    block 1: .955 .28 .983 .19 .928 .51; block 2: .74 .955 .19 .28 .15 .51 (threshold 0.9).
    Block 1: three pass the threshold (0, 2, 4): they fill the first call whenever the floor
    is at most 3; then 5 (.51) and 1 (.28) in confidence order. Block 2: only 7 passes, so
    a floor of 2 adds 6 (.74), then 11 and 9, then 8 and 10; a floor of 3 adds 6 and 11."""
    top = torch.tensor([5.0, 1.0, 6.0, 0.5, 4.5, 2.0, 3.0, 5.0, 0.5, 1.0, 0.2, 2.0])
    table = torch.zeros(12, 9)
    table[:, 0] = top  # token 0 against 7 other tokens at logit 0 (and the mask)
    best_p = subs_probs(table).max(-1).values
    assert (best_p[[0, 2, 4, 7]] >= 0.9).all() and (best_p[[1, 3, 5, 6, 8, 9, 10, 11]] < 0.9).all()
    toy = ToyDenoiser(table)
    result = generate(toy, 1, length=12, block_size=6, strategy="threshold", threshold=0.9,
                      min_tokens_per_step=floor, temperature=0)
    assert toy.seen_masks == expected_seen
    assert result.nfe["draft"]["decode"] == len(expected_seen)
    assert (result.tokens == 0).all()
    torch.testing.assert_close(result.confidence[0].double(), best_p, atol=1e-6, rtol=1e-6)


def test_a_floor_of_tokens_per_step_needs_the_threshold_strategy():
    for strategy in ("topk", "first_hitting"):
        with pytest.raises(UserError, match="min_tokens_per_step applies to the threshold strategy"):
            SamplerConfig(strategy=strategy, min_tokens_per_step=2)
    assert SamplerConfig(strategy="topk", min_tokens_per_step=1).min_tokens_per_step == 1


# -- refinement ---------------------------------------------------------------------------------


def test_remask_ratio_zero_leaves_the_draft_unchanged():
    model = tiny_model()
    result = generate(model, 2, length=24, stages=[(None, 0.0, 4)], generator=torch.Generator().manual_seed(1))
    assert torch.equal(result.tokens, result.draft_tokens)
    assert result.remasked["refine_1"].shape == (2, 0)
    assert result.nfe["refine_1"].get("forward", 0) == 0


def test_remask_ratio_one_remasks_every_generated_token_and_never_the_prompt():
    model = tiny_model()
    prompt = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    result = generate(model, prompt=prompt, length=24, stages=[(None, 1.0, 5)],
                      generator=torch.Generator().manual_seed(2))
    assert result.remasked["refine_1"].tolist() == [list(range(5, 24))] * 2
    assert torch.equal(result.tokens[:, :5], prompt)
    assert result.nfe["refine_1"]["forward"] == 5
    assert (result.tokens != model.mask_id).all()


def test_snapshot_policy_remasks_the_least_confident_draft_tokens():
    table = random_table(L=16)
    toy = ToyDenoiser(table)
    result = generate(toy, 1, prompt=torch.tensor([1, 2]), length=16, temperature=0, strategy="topk",
                      stages=[RefineStage(None, 0.5, 2)])
    draft_conf = result.draft_confidence[0, 2:]
    expected = sorted((torch.argsort(draft_conf, stable=True)[:7] + 2).tolist())
    assert result.remasked["refine_1"][0].tolist() == expected


def test_posthoc_rescoring_costs_one_forward_and_random_is_seeded():
    model = tiny_model()
    post = generate(model, 2, length=24, stages=[(None, 0.25, 3)], remask_policy="posthoc",
                    generator=torch.Generator().manual_seed(0))
    assert post.nfe["refine_1"]["rescore"] == 1 and post.nfe["refine_1"]["forward"] == 3
    runs = [generate(model, 2, length=24, stages=[(None, 0.25, 3)], remask_policy="random",
                     generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(runs[0].remasked["refine_1"], runs[1].remasked["refine_1"])
    assert torch.equal(runs[0].tokens, runs[1].tokens)


def test_small_refine_blocks_use_the_cache_and_count_commits():
    model = unfused(tiny_model())
    result = generate(model, 2, length=24, stages=[(8, 0.25, None)], generator=torch.Generator().manual_seed(0))
    nfe = result.nfe["refine_1"]
    assert nfe["commit"] == 2  # blocks 0 and 1 are committed, the last is not
    # One token per call: each block takes as many calls as its most-remasked row needs.
    idx = result.remasked["refine_1"]
    per_block = [int(((idx >= s) & (idx < s + 8)).sum(-1).max()) for s in range(0, 24, 8)]
    assert nfe["decode"] == sum(per_block) > 0
    assert (result.tokens != model.mask_id).all()


def test_stages_chain_and_results_report_every_stage():
    model = tiny_model()
    result = generate(model, 2, length=24, stages=[(None, 0.25, 2), (8, 0.25, 2)],
                      generator=torch.Generator().manual_seed(0))
    assert list(result.nfe) == ["draft", "refine_1", "refine_2"] == list(result.seconds)
    assert set(result.remasked) == {"refine_1", "refine_2"}
    assert result.total_nfe == sum(sum(v.values()) for v in result.nfe.values())
    assert "refine_2" in result.summary_table()


# -- reproducibility and batching ------------------------------------------------------------


def test_same_seed_same_tokens_and_another_seed_differs():
    model = tiny_model()
    kwargs = dict(length=32, strategy="topk", stages=[(None, 0.25, 4)])
    a = generate(model, 3, generator=torch.Generator().manual_seed(7), **kwargs)
    b = generate(model, 3, generator=torch.Generator().manual_seed(7), **kwargs)
    c = generate(model, 3, generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.confidence, b.confidence)
    assert not torch.equal(a.tokens, c.tokens)


SAMPLER_SETTINGS = {
    "first_hitting": dict(strategy="first_hitting"),
    "topk": dict(strategy="topk", tokens_per_step=2),
    "threshold": dict(strategy="threshold", threshold=0.5),
    "threshold_floor": dict(strategy="threshold", threshold=0.5, min_tokens_per_step=2),
    "block_stage": dict(strategy="topk", stages=[(8, 0.3, 2), (None, 0.25, 4)]),
    "reuse_context": dict(strategy="topk", stages=[RefineStage(None, 0.3, 4, reuse_context=True)]),
    "posthoc": dict(strategy="threshold", threshold=0.5, remask_policy="posthoc"),
    "random_policy": dict(strategy="first_hitting", remask_policy="random"),
    "mdlm": dict(method="mdlm", mdlm_steps=8),
    # Rows stop at their own EOS, so they remask different counts (reused-context padding).
    "eos_reuse_context": dict(strategy="topk", stop_at_eos=True, stages=[RefineStage(None, 0.5, 3, reuse_context=True)]),
}


def eos_ending_rows_apart(model, seeds, kwargs):
    """A token id whose first draft occurrence differs between the rows: as EOS it stops them
    at different lengths (the draft before a row's stop does not depend on the stop)."""
    draft = generate(model, len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)
    P, L = len(kwargs["prompt"]), draft.tokens.shape[1]
    for t in range(model.mask_id):
        hits = draft.tokens[:, P:] == t
        first = torch.where(hits.any(-1), hits.int().argmax(-1), L)
        if hits.any() and len(set(first.tolist())) > 1:
            return t
    pytest.fail("every token starts at one position in all rows")


@pytest.mark.parametrize("setting", sorted(SAMPLER_SETTINGS))
def test_a_row_in_a_batch_equals_the_row_alone_with_its_generator(setting):
    """The sampler's own bookkeeping (step schedules, draws, remask counts, padding) makes a
    row depend only on its generator and its own logits: checked exactly on a model whose
    forward is row-independent by construction, with rows that end up with different
    remask counts and step counts, a prompt, and every draft and refine path."""
    model = RowByRow(tiny_model())
    kwargs = {**dict(length=29, stages=[(None, 0.25, 4)], prompt=torch.tensor([3, 1, 4, 1, 5])),
              **SAMPLER_SETTINGS[setting]}
    seeds = [10, 11, 12]
    if setting == "eos_reuse_context":
        kwargs["eos_id"] = eos_ending_rows_apart(model, seeds, {**kwargs, "stop_at_eos": False, "stages": []})
    batch = generate(model, 3, generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)
    assert len({tuple(r.tolist()) for r in batch.tokens}) == 3
    if setting == "eos_reuse_context":
        assert len(set(batch.lengths.tolist())) > 1
    for row, seed in enumerate(seeds):
        alone = generate(model, 1, generator=[torch.Generator().manual_seed(seed)], **kwargs)
        assert torch.equal(batch.tokens[row], alone.tokens[0])
        assert torch.equal(batch.draft_tokens[row], alone.draft_tokens[0])
        assert torch.equal(batch.confidence[row], alone.confidence[0])


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("prompt", [None, [7, 3, 9, 1, 4, 2]])
def test_llama_rows_in_a_batch_equal_the_rows_alone(shift, prompt):
    """DiDSampler runs LlamaBlockDiffusionLM unchanged, and a row's draft and global
    refinement depend only on its generator and its own logits: with and without logit
    shift, with and without a prompt (the prompt's whole block prefilled, the rest of it
    drafted around), confidence-ordered draft and a global refine stage."""
    model = RowByRow(tiny_llama(shift))
    kwargs = dict(length=27, strategy="topk", tokens_per_step=2, stages=[(None, 0.3, 3)],
                  prompt=None if prompt is None else torch.tensor(prompt))
    seeds = [21, 22, 23]
    batch = generate(model, 3, generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)
    assert len({tuple(r.tolist()) for r in batch.tokens}) == 3 and (batch.tokens != model.mask_id).all()
    assert batch.nfe["refine_1"]["forward"] == 3
    for row, seed in enumerate(seeds):
        alone = generate(model, 1, generator=[torch.Generator().manual_seed(seed)], **kwargs)
        assert torch.equal(batch.tokens[row], alone.tokens[0])
        assert torch.equal(batch.draft_tokens[row], alone.draft_tokens[0])
        assert torch.equal(batch.confidence[row], alone.confidence[0])
        assert torch.equal(batch.remasked["refine_1"][row], alone.remasked["refine_1"][0])


@torch.no_grad()
@pytest.mark.parametrize("make_model", [tiny_model, lambda: tiny_llama(True), lambda: tiny_llama(False)],
                         ids=["dit", "llama_shift", "llama_no_shift"])
def test_batched_forwards_agree_with_row_alone_forwards_within_rounding(make_model):
    """What holds for the plain batched model, where a BLAS decides: every forward the
    sampler uses gives each row the logits of that row computed alone, up to float32
    rounding (not bit for bit: MKL takes other paths for 1 and 3 rows), so a draw differs
    only where two candidates nearly tie."""
    model = make_model()
    alone = RowByRow(model)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.mask_id, (3, 24), generator=g)
    tokens[torch.rand(3, 24, generator=g) < 0.3] = model.mask_id

    def check(batched, rowwise):
        torch.testing.assert_close(batched, rowwise, rtol=1e-5, atol=1e-5 * float(rowwise.abs().max()))

    check(model(tokens), alone(tokens))
    check(model(tokens, block_size=4), alone(tokens, block_size=4))
    cache, caches = model.new_kv_cache(3), alone.new_kv_cache(3)
    model.commit(tokens[:, :8], cache, block_size=4)
    alone.commit(tokens[:, :8], caches, block_size=4)
    check(model.decode(tokens[:, 8:12], cache), alone.decode(tokens[:, 8:12], caches))
    check(model.commit_and_decode(tokens[:, 8:12], tokens[:, 12:16], cache),
          alone.commit_and_decode(tokens[:, 8:12], tokens[:, 12:16], caches))


def test_kv_cached_draft_equals_uncached_block_causal_draft_under_greedy():
    """The two compute the same logits up to float32 rounding (tests/modeling/test_dit.py). Greedy
    first-hitting draws are argmaxes at positions the generator picks, so the tokens agree
    unless two logits tie within that rounding (~1e-6 here, against top-2 gaps of 0.07 and
    more); a confidence-ranked strategy would instead compare near-1 probabilities, which
    rounding can reorder."""
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6]] * 2)
    kwargs = dict(prompt=prompt, length=32, temperature=0, strategy="first_hitting")
    cached = generate(model, generator=torch.Generator().manual_seed(3), **kwargs)
    uncached = generate(UncachedModel(model), generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(cached.tokens, uncached.tokens)
    torch.testing.assert_close(cached.confidence, uncached.confidence, atol=1e-5, rtol=1e-5)


def unfused(model):
    """The model without commit_and_decode: the sampler commits each block by itself."""
    model.supports_commit_and_decode = False  # instance attribute over the class's
    return model


class FoldedByHand(torch.nn.Module):
    """The model with commit_and_decode = commit, then decode (two forwards, counted as one)."""

    supports_commit_and_decode = True

    def __init__(self, model):
        super().__init__()
        self.inner, self.mask_id, self.config = unfused(model), model.mask_id, model.config
        self.supports_logit_positions = model.supports_logit_positions
        self.new_kv_cache, self.decode, self.commit = model.new_kv_cache, model.decode, model.commit

    def commit_and_decode(self, clean, block, cache, **kwargs):
        self.inner.commit(clean, cache)
        return self.inner.decode(block, cache, **kwargs)

    def forward(self, tokens, **kwargs):
        return self.inner(tokens, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(length=32, strategy="first_hitting", stages=[(None, 0.25, 4)]),
    dict(length=48, strategy="topk", prompt=list(range(1, 7)), stages=[(8, 0.5, 3), (4, 0.2, None)]),
    dict(length=30, strategy="threshold", threshold=0.3, block_size=3, prompt=[5, 6, 7]),
])
def test_commit_folded_into_the_next_decode_changes_nothing_but_the_forward_count(kwargs):
    """The sampler folds each block's commit into the next block's first decode at the
    right moments: a model whose commit_and_decode is commit-then-decode by construction
    gives the same tokens and confidences, bit for bit, as separate commits, with the same
    decode calls, and makes no separate commit forwards except the prompt prefill and blocks
    that needed no decode call. (That the model's fused forward equals commit-then-decode,
    up to float32 rounding, is tests/modeling/test_dit.py's.)"""
    kwargs = dict(batch_size=2, generator=torch.Generator().manual_seed(5), **kwargs)
    fused = generate(FoldedByHand(tiny_model()), **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(5)
    split = generate(unfused(tiny_model()), **kwargs)
    assert torch.equal(fused.tokens, split.tokens) and torch.equal(fused.draft_tokens, split.draft_tokens)
    assert torch.equal(fused.confidence, split.confidence)
    bs = kwargs.get("block_size", 4)
    P = len(kwargs.get("prompt", []))
    blocks = -(-kwargs["length"] // bs)
    assert split.nfe["draft"]["commit"] == blocks - 1  # prefill blocks + every block but the last
    assert fused.nfe["draft"]["commit"] == P // bs  # the prefill only
    for stage in fused.nfe:
        assert fused.nfe[stage].get("decode") == split.nfe[stage].get("decode")
        assert fused.nfe[stage].get("commit", 0) <= split.nfe[stage].get("commit", 0)


def test_generation_past_the_context_slides_the_cache():
    model = tiny_model()
    result = generate(model, 2, length=48, generator=torch.Generator().manual_seed(0))  # model_length 32
    assert result.tokens.shape == (2, 48) and (result.tokens != model.mask_id).all()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, 2, length=48, stages=[(None, 0.25, 2)])


class FullContextCache(torch.nn.Module):
    """The model with every cache sized as before: the whole context beside the active block,
    whatever max_len the sampler asks for. Records the capacities the sampler asked for."""

    def __init__(self, model, full: bool):
        super().__init__()
        self.inner, self.mask_id, self.config, self.full = model, model.mask_id, model.config, full
        self.supports_logit_positions = model.supports_logit_positions
        self.supports_commit_and_decode = model.supports_commit_and_decode
        self.decode, self.commit, self.commit_and_decode = model.decode, model.commit, model.commit_and_decode
        self.asked = []

    def new_kv_cache(self, batch_size, max_len=None):
        self.asked.append(max_len)
        if self.full:
            max_len = self.config.model_length - self.config.block_size
        return self.inner.new_kv_cache(batch_size, max_len=max_len)

    def forward(self, tokens, **kwargs):
        return self.inner(tokens, **kwargs)


def test_a_short_generation_of_a_long_context_model_gets_a_small_cache_and_the_same_tokens():
    """The cache holds what the generation commits (every block but the last, prompt
    included), not the model's context: 20 and 16 positions here, not 1020, with the same
    tokens and confidences as a cache of the whole context."""
    model = tiny_model(model_length=1024)
    kwargs = dict(length=23, block_size=4, prompt=torch.tensor([3, 1, 4, 1, 5]), strategy="topk",
                  stages=[(8, 0.4, 2), (None, 0.25, 2)])
    small, full = FullContextCache(model, full=False), FullContextCache(model, full=True)
    a = generate(small, 2, generator=torch.Generator().manual_seed(4), **kwargs)
    b = generate(full, 2, generator=torch.Generator().manual_seed(4), **kwargs)
    assert small.asked == [20, 16]  # draft: 6 blocks of 4, all but the last; refine: 3 of 8
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.draft_tokens, b.draft_tokens)
    torch.testing.assert_close(a.confidence, b.confidence, rtol=1e-6, atol=1e-6)
    assert a.nfe == b.nfe


def test_cache_capacity_is_capped_by_the_context_so_long_generations_still_slide():
    sampler = DiDSampler(tiny_model(), SamplerConfig())  # model_length 32
    assert [sampler._cache_capacity(L, 4) for L in (1, 4, 5, 23, 29, 32, 48, 1000)] == [4, 4, 4, 20, 28, 28, 28, 28]
    assert sampler._cache_capacity(30, 20) == 20  # a block over half the context: the block itself


# -- EOS, MDLM baseline, arguments ----------------------------------------------------------------


def test_stop_at_eos_ends_rows_and_refinement_keeps_the_stop():
    table = random_table(L=16, V=9)
    table[5, 7] = 50.0  # position 5 is certainly token 7 (our EOS)
    toy = ToyDenoiser(table)
    result = generate(toy, 2, length=16, eos_id=7, stop_at_eos=True, temperature=0, strategy="topk",
                      stages=[(None, 1.0, 2)])
    for row in range(2):
        first_eos = result.tokens[row].tolist().index(7)
        assert first_eos <= 5
        assert result.lengths[row] == first_eos + 1
        assert (result.tokens[row, first_eos:] == 7).all()
        assert (result.remasked["refine_1"][row] < first_eos).all()


def test_mdlm_baseline_fills_everything_from_all_mask():
    model = tiny_model()
    result = generate(model, 2, prompt=torch.tensor([1, 2, 3]), length=24, method="mdlm", mdlm_steps=6,
                      generator=torch.Generator().manual_seed(0))
    assert result.nfe["draft"] == {"forward": 6}
    assert (result.tokens != model.mask_id).all() and result.tokens[:, :3].tolist() == [[1, 2, 3]] * 2


def test_bd3lm_preset_config_and_bad_arguments():
    assert SamplerConfig.bd3lm().stages == [] and SamplerConfig.bd3lm().strategy == "first_hitting"
    with pytest.raises(ValueError, match="strategy"):
        SamplerConfig(strategy="greedy")
    with pytest.raises(ValueError, match="remask_ratio"):
        RefineStage(None, 1.5, 2)
    with pytest.raises(ValueError, match="remask_policy"):
        SamplerConfig(remask_policy="lowest")
    model = tiny_model()
    with pytest.raises(ValueError, match="prompt token ids"):
        generate(model, 1, prompt=torch.tensor([model.mask_id]))
    with pytest.raises(ValueError, match="no room"):
        generate(model, 1, prompt=torch.arange(10), length=10)
    with pytest.raises(ValueError, match="generator"):
        generate(model, 2, generator=[torch.Generator()])
    sampler = DiDSampler(model, SamplerConfig(length=16))
    assert sampler.generate(2).tokens.shape == (2, 16)


@pytest.mark.parametrize("field,value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -1.0), ("temperature", "1"),
    ("top_p", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("threshold", float("-inf")), ("threshold", 2.0),
    ("length", 0), ("length", -3), ("length", 16.0), ("block_size", 0), ("block_size", 2.5), ("block_size", True),
    ("tokens_per_step", 0), ("min_tokens_per_step", 0), ("min_tokens_per_step", 1.5), ("mdlm_steps", 0), ("eos_id", -1), ("eos_id", 3.0), ("mask_id", -2),
    ("stop_at_eos", "yes"), ("stages", "global"), ("stages", [(None, float("nan"), 2)]), ("stages", [(4, 0.5, 0)]),
    ("stages", [(2.5, 0.5, 2)]), ("stages", [(None,)*4]),
])
def test_bad_sampler_settings_are_refused_naming_the_setting(field, value):
    with pytest.raises(UserError) as info:
        SamplerConfig(**{field: value})
    name = {"stages": "stage|remask_ratio|steps|block_size"}.get(field, field)
    assert re.search(name, str(info.value)), str(info.value)


def test_bad_generate_arguments_are_refused_before_any_model_call():
    toy = ToyDenoiser(random_table(L=12, V=9))  # no vocab_size in its config: ids checked against the mask
    model = tiny_model()  # vocab 29, context 32
    cases = [
        (dict(batch_size=-1), "batch_size"), (dict(batch_size=0), "batch_size"), (dict(batch_size=2.0), "batch_size"),
        (dict(prompt=torch.tensor([1.0, 2.0])), "integer token ids"), (dict(prompt=[1.5, 2]), "integer token ids"),
        (dict(prompt=torch.tensor([True])), "integer token ids"), (dict(prompt=[-1]), "prompt token ids"),
        (dict(length=12, stages=[(None, 0.5, 2)], prompt=[0] * 12), "no room"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            generate(toy, length=kwargs.pop("length", 12), **kwargs)
    assert sum(toy.calls.values()) == 0
    with pytest.raises(UserError, match="prompt token ids"):
        generate(model, 1, prompt=[29])  # outside the vocabulary
    with pytest.raises(UserError, match="mask_id 29 is outside"):
        generate(model, 1, mask_id=29)
    with pytest.raises(UserError, match="eos_id 40 is outside"):
        generate(model, 1, eos_id=40)
    with pytest.raises(UserError, match="mask token"):
        generate(model, 1, eos_id=model.mask_id)


def test_an_empty_prompt_is_no_prompt():
    model = tiny_model()
    for empty in ([], torch.tensor([]), torch.zeros(0, dtype=torch.int64)):
        result = generate(model, 2, prompt=empty, length=8, stages=[], generator=torch.Generator().manual_seed(1))
        assert result.prompt_length == 0 and result.tokens.shape == (2, 8)


def test_a_length_no_global_stage_can_take_is_refused_before_the_draft():
    toy = ToyDenoiser(random_table(L=16, V=9))
    toy.config.model_length = 12  # drafts past its context (sliding cache); global blocks cannot
    for kwargs in (dict(stages=[(4, 0.5, 2), (None, 0.25, 2)]), dict(method="mdlm"),
                   dict(stages=[(16, 0.5, 2)])):  # a block covering the sequence is global too
        with pytest.raises(UserError, match="exceeds the model's context"):
            generate(toy, 1, length=16, **kwargs)
    with pytest.raises(UserError, match="exceeds the model's context"):
        DiDSampler(toy).refine(generate(toy, 1, length=16, stages=[]), [(None, 0.5, 2)])
    assert toy.calls["forward"] == 0 and toy.calls["decode"] == 16  # only the draft that refine was given



def _dense_nucleus(groups, shape):
    """Groups from _nucleus_groups -> one dense [M, V] tensor of kept probabilities."""
    dense = torch.zeros(shape, dtype=torch.float64)
    for sel, p, ids in groups:
        dense[sel] = p if ids is None else torch.zeros(p.shape[0], shape[1], dtype=torch.float64).scatter_(-1, ids, p)
    return dense


@pytest.mark.parametrize("top_p", [0.3, 0.9, 1.0])
def test_nucleus_both_paths_keep_the_sorted_prefix(top_p):
    from did_engine.sampling.drawing import _nucleus_groups
    gen = torch.Generator().manual_seed(3)
    # Rows from peaked (nucleus within the first 16) to flat (nucleus past them).
    logits = torch.randn(9, 97, generator=gen, dtype=torch.float64) * torch.linspace(0.05, 8, 9, dtype=torch.float64)[:, None]
    probs = logits.softmax(-1)
    sp, order = probs.sort(-1, descending=True)
    keep = (sp.cumsum(-1) - sp) < top_p
    expected = torch.zeros_like(probs).scatter_(-1, order, sp * keep) if top_p < 1.0 else probs
    groups = _nucleus_groups(probs, top_p, first_k=16)
    if top_p < 1.0:
        assert len(groups) == 2  # both the partial-selection and the full-sort path ran
    torch.testing.assert_close(_dense_nucleus(groups, probs.shape), expected, rtol=0, atol=0)


def test_nucleus_by_buckets_on_ties_zeros_and_wide_ranges():
    """The sort-free nucleus (flat rows) against sorting, where buckets are hardest: many equal
    probabilities, zeros (the SUBS mask), probabilities spanning hundreds of powers of two."""
    from did_engine.sampling.drawing import _keep_prefix, _nucleus_by_buckets
    gen = torch.Generator().manual_seed(8)
    uniform = torch.full((1, 7), 1 / 7, dtype=torch.float64)
    kept = _nucleus_by_buckets(uniform, 0.5)
    assert int((kept > 0).sum()) == 4 and torch.equal(kept[kept > 0], uniform[0, :4])  # 0, 1/7, 2/7, 3/7 < 0.5
    wide = (torch.randn(5, 301, generator=gen, dtype=torch.float64) * 40).softmax(-1)  # down to ~1e-300
    ties = torch.randint(1, 6, (5, 301), generator=gen).double()
    ties[:, 0] = 0.0  # the mask column
    ties /= ties.sum(-1, keepdim=True)
    for probs in (wide, ties):
        for top_p in (0.1, 0.5, 0.95, 0.999999):
            sp, order = probs.sort(-1, descending=True)
            expected = torch.zeros_like(probs).scatter_(-1, order, _keep_prefix(sp, top_p))
            got = _nucleus_by_buckets(probs, top_p)
            # The same count and mass per row (which of several equal values is kept may differ).
            assert torch.equal((got > 0).sum(-1), (expected > 0).sum(-1))
            torch.testing.assert_close(got.sum(-1), expected.sum(-1), rtol=1e-12, atol=0)
            if probs is wide:
                assert torch.equal(got, expected)


def test_nucleus_draw_frequencies_match_the_renormalised_nucleus():
    from did_engine.sampling.drawing import _sample_tokens
    gen = torch.Generator().manual_seed(4)
    probs = (torch.randn(1, 40, generator=gen, dtype=torch.float64) * 1.5).softmax(-1)
    sp, order = probs.sort(-1, descending=True)
    keep = (sp.cumsum(-1) - sp) < 0.8
    expected = torch.zeros_like(probs).scatter_(-1, order, sp * keep)[0]
    expected /= expected.sum()
    n = 40000
    draws = _sample_tokens(probs.expand(n, -1), 0.8, torch.zeros(n, dtype=torch.int64), gen)
    freq = torch.bincount(draws, minlength=40).double() / n
    assert (freq[expected == 0] == 0).all()  # nothing outside the nucleus, ever
    # 4 binomial standard deviations at the largest probability.
    assert (freq - expected).abs().max() < 4 * (0.25 / n) ** 0.5


def test_token_drawer_chunks_rows_without_changing_any_draw():
    """The drawer works through the rows in chunks (bounded memory); with per-row generators a
    batch row is never split, so chunked draws equal one-pass draws exactly."""
    from did_engine.sampling.drawing import TokenDrawer
    gen = torch.Generator().manual_seed(5)
    where = torch.rand(6, 11, generator=gen) < 0.6  # [B, W]: uneven positions per row
    logits = torch.randn(int(where.sum()), 23, generator=gen) * torch.rand(int(where.sum()), 1, generator=gen) * 6
    results = []
    for chunk in (1 << 25, 23 * 3, 1):  # one pass; a few rows per chunk; one row per chunk
        drawer = TokenDrawer(22, 1.0, 0.9, [torch.Generator().manual_seed(40 + b) for b in range(6)])
        drawer.chunk_elements = chunk
        results.append(drawer(logits.clone(), where))
    for tokens, confidence in results[1:]:
        assert torch.equal(tokens, results[0][0]) and torch.equal(confidence, results[0][1])
    assert (results[0][0] != 22).all()  # never the mask
    probs = logits.clone()
    probs[:, 22] = float("-inf")
    torch.testing.assert_close(results[0][1], probs.softmax(-1).gather(-1, results[0][0][:, None])[:, 0])
    # One shared generator: chunking changes which draw a row gets, never what is drawable.
    shared = TokenDrawer(22, 0.0, 0.9, torch.Generator().manual_seed(1))
    shared.chunk_elements = 23 * 2
    tokens, _ = shared(logits.clone(), where)
    assert torch.equal(tokens, probs.argmax(-1))  # greedy, chunked


def test_refine_a_finished_draft_equals_generating_with_the_stages():
    model = tiny_model()
    stages = [(None, 0.25, 3), (8, 0.5, 2)]
    seeds = [3, 4, 5]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    whole = generate(model, 3, length=32, strategy="topk", stages=stages, generator=gens)
    sampler = DiDSampler(model, SamplerConfig(length=32, strategy="topk", stages=[]))
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    draft = sampler.generate(3, generator=gens)
    kept = draft.tokens.clone()
    refined = sampler.refine(draft, stages, generator=gens)  # the same generator objects, carried on
    assert torch.equal(draft.tokens, kept) and list(draft.nfe) == ["draft"]  # the draft is left as it was
    assert torch.equal(refined.tokens, whole.tokens) and torch.equal(refined.confidence, whole.confidence)
    assert torch.equal(refined.draft_tokens, whole.draft_tokens)
    assert refined.nfe == whole.nfe and list(refined.seconds) == ["draft", "refine_1", "refine_2"]
    for name in ("refine_1", "refine_2"):
        assert torch.equal(refined.remasked[name], whole.remasked[name])
    again = sampler.refine(refined, [(None, 0.1, 1)])  # stages chain on: numbered after the earlier ones
    assert list(again.nfe) == ["draft", "refine_1", "refine_2", "refine_3"]


def test_refine_reusing_the_context_runs_one_full_forward_then_partial_ones():
    model = tiny_model()
    kwargs = dict(length=32, strategy="topk")
    seeds = [1, 2, 3]
    exact = generate(model, 3, stages=[(None, 0.25, 4)], generator=[torch.Generator().manual_seed(s) for s in seeds],
                     **kwargs)
    reuse = generate(model, 3, stages=[RefineStage(None, 0.25, 4, reuse_context=True)],
                     generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)
    assert exact.nfe["refine_1"] == {"forward": 4}
    assert reuse.nfe["refine_1"] == {"forward": 1, "partial": 3}
    assert torch.equal(reuse.draft_tokens, exact.draft_tokens)
    assert torch.equal(reuse.remasked["refine_1"], exact.remasked["refine_1"])
    # Only remasked positions change; all of them are filled.
    changed = reuse.tokens != reuse.draft_tokens
    idx = reuse.remasked["refine_1"]
    remasked = torch.zeros_like(changed).scatter_(1, idx.clamp(min=0), idx >= 0)
    assert not (changed & ~remasked).any() and (reuse.tokens != model.mask_id).all()
    # The first step is the exact one: with a single step both agree.
    one = [generate(model, 3, stages=[RefineStage(None, 0.25, 1, reuse_context=flag)],
                    generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs) for flag in (False, True)]
    assert torch.equal(one[0].tokens, one[1].tokens)


def test_reused_context_rows_do_not_depend_on_the_other_rows_remask_counts():
    """Rows remask different numbers of positions (EOS stops, rounding); the shorter rows are
    padded with positions whose K/V are never written, so each row's logits equal the row's
    own, computed alone."""
    from did_engine.sampling.sampler import _ContextReuse
    model = tiny_model()
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, model.mask_id, (3, 32), generator=gen)
    targets = torch.zeros(3, 32, dtype=torch.bool)
    targets[0, [3, 9]] = True
    targets[1, [0, 5, 6, 20, 31]] = True  # row 2 remasks nothing
    tokens[targets] = model.mask_id
    refill = torch.randint(0, model.mask_id, (3, 32), generator=gen)
    with torch.no_grad():
        batch = _ContextReuse(model, targets, {"forward": 0})
        batch(tokens, logit_positions=targets)
        filled = torch.where(targets & (torch.arange(32) % 2 == 0), refill, tokens)  # a step fills some
        still = filled == model.mask_id
        packed = batch(filled, logit_positions=still)  # [M, V], rows in order
        assert batch.counter == {"forward": 1, "partial": 1}
        start = 0
        for b in range(3):
            alone = _ContextReuse(model, targets[b : b + 1], {"forward": 0})
            alone(tokens[b : b + 1], logit_positions=targets[b : b + 1])
            mine = alone(filled[b : b + 1], logit_positions=still[b : b + 1])
            n = int(still[b].sum())
            torch.testing.assert_close(packed[start : start + n], mine, atol=1e-5, rtol=1e-5)
            start += n


def test_reuse_context_needs_refine_forward_and_a_global_stage():
    table = random_table(L=12, V=9)
    with pytest.raises(ValueError, match="refine_forward"):
        generate(ToyDenoiser(table), 1, stages=[RefineStage(None, 0.5, 2, reuse_context=True)])
    with pytest.raises(ValueError, match="global"):
        generate(tiny_model(), 1, length=16, stages=[RefineStage(8, 0.5, 2, reuse_context=True)])
    # A block covering the whole sequence is a global stage.
    result = generate(tiny_model(), 1, length=16, stages=[RefineStage(16, 0.5, 2, reuse_context=True)])
    assert result.nfe["refine_1"] == {"forward": 1, "partial": 1}
