"""LlamaBlockDiffusionLM: exact against transformers' Llama / Qwen2 / Qwen3, its forwards
agree with each other (decode == block-causal == training rows), the logit shift, the cache,
checkpoints, and the sampler running it unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from did_engine.modeling.checkpoint import CheckpointError
from did_engine.errors import UserError
from did_engine.modeling.loading import load_model
from did_engine.modeling.llama import LastHiddenKVCache, LlamaBlockConfig, LlamaBlockDiffusionLM
from did_engine.ops.reference import block_causal_mask
from support import BD3LM_FIXTURE

transformers = pytest.importorskip("transformers", reason="the exactness tests compare against transformers")

from support.hf_llama import (KINDS, check_close, check_shifted, hf_model, ours_from, random_ours,  # noqa: E402
                              same, tokens_for)

# -- (a), (b): exact against transformers -----------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("L", [13, 1, 30])
def test_block_size_one_is_transformers_causal_lm(kind, shift, L):
    hf = hf_model(kind)
    ours = ours_from(hf, shift)
    x = tokens_for(ours, (3, L))
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x, block_size=1)
    if shift:
        check_shifted(got, want)
    else:
        check_close(got, want)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("L,block", [(13, 4), (17, 3), (12, 12), (9, 20)])
def test_block_causal_forward_is_transformers_under_the_same_4d_mask(kind, attn, L, block):
    hf = hf_model(kind, seed=2, attn=attn)
    ours = ours_from(hf, shift=False)
    x = tokens_for(ours, (2, L), seed=3, masked=0.3)
    allowed = block_causal_mask(L, block)  # [L, L]: query block j sees key blocks 0..j
    additive = torch.zeros(2, 1, L, L).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        want = hf(x, attention_mask=additive).logits
        check_close(ours(x, block_size=block), want)
        shifted = ours_from(hf, shift=True)(x, block_size=block)
    check_shifted(shifted, want)
    if block >= L:  # one block over everything: the global bidirectional forward
        with torch.no_grad():
            check_close(ours(x), want)


# -- (c): decode == block-causal == training rows -------------------------------------------


@pytest.mark.parametrize("kind,shift,L,block", [
    ("qwen3", False, 23, 4),
    ("qwen3", True, 23, 4),
    ("qwen2", True, 17, 5),
    ("llama", True, 16, 1),
    ("llama_bias", False, 19, 3),
])
def test_decode_equals_block_causal_equals_training_rows(kind, shift, L, block):
    model = random_ours(kind, shift, seed=4)
    x0 = tokens_for(model, (3, L), seed=5)
    xt = tokens_for(model, (3, L), seed=5, masked=0.5)
    xt = torch.where(xt == model.mask_id, xt, x0)
    with torch.no_grad():
        train = model(xt, x0=x0, block_size=block)
        cache = model.new_kv_cache(3, max_len=L)
        for start in range(0, L, block):
            end = min(start + block, L)
            # x_t block j after clean blocks < j: the same rows in all three forwards.
            prefix = torch.cat([x0[:, :start], xt[:, start:end]], dim=1)
            causal = model(prefix, block_size=block)[:, start:end]
            decoded = model.decode(xt[:, start:end], cache)
            same(decoded, causal)
            same(decoded, train[:, start:end])
            model.commit(x0[:, start:end], cache)


def test_shift_decode_row_zero_is_the_prefix_last_position_logits():
    """Row 0 of a decoded block predicts from the last committed position: with blocks of
    one token that is transformers' next-token prediction after the prefix; with blocks of
    b, the prefix's block-causal last hidden state, whatever the new block holds."""
    hf = hf_model("qwen2", seed=6)
    x = tokens_for(ours_from(hf), (2, 21), seed=7)
    with torch.no_grad():
        for block, P in ((1, 9), (4, 12), (5, 10)):
            model = ours_from(hf, shift=True, block_size=block)
            cache = model.new_kv_cache(2, max_len=32)
            model.commit(x[:, :P], cache, block_size=block)
            rows = [model.decode(x[:, P : P + block], cache)[:, 0],
                    model.decode(torch.full((2, block), model.mask_id), cache)[:, 0]]
            if block == 1:
                want = hf(x[:, :P]).logits[:, -1]
            else:
                allowed = block_causal_mask(P, block)
                want = hf(x[:, :P], attention_mask=torch.zeros(2, 1, P, P).masked_fill(~allowed, float("-inf"))
                          ).logits[:, -1]
            for row in rows:
                check_close(row, want)
        # An empty cache has no last position: row 0 is all zeros.
        first = model.decode(x[:, :5], model.new_kv_cache(2, max_len=8))[:, 0]
        assert torch.equal(first, torch.zeros_like(first))


def test_training_forward_with_full_block_is_the_global_forward():
    model = random_ours("qwen3", shift=True)
    x0 = tokens_for(model, (2, 15))
    xt = tokens_for(model, (2, 15), masked=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(xt, x0=x0, block_size=15), model(xt))
        same(model(xt, block_size=15), model(xt))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("shift", [True, False])
def test_eager_flex_training_forward_equals_the_sdpa_path(shift):
    """The FlexAttention training path (CUDA's default, here uncompiled) takes grouped K/V
    heads expanded to the query heads: the same logits as dense-mask SDPA."""
    model = random_ours("qwen3", shift, seed=29)
    x0 = tokens_for(model, (2, 21), seed=30)
    xt = tokens_for(model, (2, 21), seed=30, masked=0.5)
    with torch.no_grad():
        model.training_attention = "sdpa"
        dense = model(xt, x0=x0, block_size=4)
        assert model.last_training_attention == "sdpa-dense"
        model.training_attention = "flex-eager"
        flex = model(xt, x0=x0, block_size=4)
        assert model.last_training_attention == "flex-eager"
    same(flex, dense)


def test_shift_training_rows_take_the_clean_stream_at_block_starts():
    """With logit shift, the first token of x_t block j is predicted from the clean x_0
    position before it (x_t's own previous block is invisible), so its logits do not depend
    on what x_t holds there; the other rows do."""
    model = random_ours("qwen2", shift=True, seed=8)
    x0 = tokens_for(model, (2, 16), seed=9)
    xt = tokens_for(model, (2, 16), seed=9, masked=0.6)
    other = xt.clone()
    other[:, 3] = (xt[:, 3] + 1) % model.mask_id  # last token of x_t block 0 (block 4)
    with torch.no_grad():
        a, b = model(xt, x0=x0, block_size=4), model(other, x0=x0, block_size=4)
    assert torch.equal(a[:, 4:], b[:, 4:])  # row 4 starts block 1: predicted from x0[3]
    assert not torch.allclose(a[:, :4], b[:, :4])
    assert torch.equal(a[:, 0], torch.zeros_like(a[:, 0]))


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("P,block", [(16, 4), (18, 4), (15, 5), (7, 1)])
def test_prompt_prefill_in_one_forward_equals_block_by_block_commits(shift, P, block):
    model = random_ours("qwen3", shift, seed=10, block_size=block)
    x = tokens_for(model, (3, 24), seed=11)
    with torch.no_grad():
        one, blocks = model.new_kv_cache(3, max_len=24), model.new_kv_cache(3, max_len=24)
        assert model.commit(x[:, :P], one, block_size=block) == 1
        model.prefill_in_one_pass = False
        assert model.commit(x[:, :P], blocks, block_size=block) == -(-P // block)
        assert torch.equal(one.lengths, blocks.lengths)
        for got, want in ((one.k[:, :, :P], blocks.k[:, :, :P]), (one.v[:, :, :P], blocks.v[:, :, :P])):
            torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)
        if shift:
            same(one.last_hidden, blocks.last_hidden)
        rest = x[:, P : P + block]
        same(model.decode(rest, one), model.decode(rest, blocks))


@pytest.mark.parametrize("shift,block,n2", [(True, 4, 4), (False, 3, 1), (True, 5, 2), (True, 4, 1), (True, 1, 1)])
def test_commit_and_decode_equals_commit_then_decode(shift, block, n2):
    """Every block of a sequence that overflows the cache (the sliding window included)."""
    model = random_ours("qwen2", shift, seed=12, block_size=block)
    x0 = tokens_for(model, (3, 40), seed=13)
    xt = tokens_for(model, (3, 40), seed=13, masked=0.5)
    with torch.no_grad():
        fused, split = model.new_kv_cache(3, max_len=2 * block + 1), model.new_kv_cache(3, max_len=2 * block + 1)
        model.commit(x0[:, :block], fused)
        model.commit(x0[:, :block], split)
        for start in range(block, 40 - block - n2 + 1, block):
            clean, noisy = x0[:, start : start + block], xt[:, start + block : start + block + n2]
            need = noisy == model.mask_id
            got = model.commit_and_decode(clean, noisy, fused)
            model.commit(clean, split)
            same(got, model.decode(noisy, split))
            assert torch.equal(fused.lengths, split.lengths) and torch.equal(fused.offset, split.offset)
            n = int(split.lengths[0])
            same(fused.k[:, :, :n], split.k[:, :, :n])
            if shift:
                same(fused.last_hidden, split.last_hidden)
            copy = model.new_kv_cache(3, max_len=2 * block + 1).copy_(fused)
            packed = model.commit_and_decode(x0[:, start + block : start + 2 * block], noisy, copy,
                                             logit_positions=need)
            model.commit(x0[:, start + block : start + 2 * block], split)
            same(packed, model.decode(noisy, split)[need])
            split.copy_(fused)
        assert int(fused.offset[0]) > 0  # the window slid


def test_decode_does_not_change_the_cache():
    model = random_ours("qwen3", shift=True)
    cache = model.new_kv_cache(2, max_len=12)
    with torch.no_grad():
        model.commit(tokens_for(model, (2, 4)), cache)
        before = (cache.k.clone(), cache.v.clone(), cache.lengths.clone(), cache.last_hidden.clone())
        model.decode(tokens_for(model, (2, 4), masked=0.5), cache)
    after = (cache.k, cache.v, cache.lengths, cache.last_hidden)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("shift", [True, False])
def test_refine_forward_full_pass_is_global_and_partial_passes_reuse_it(shift):
    model = random_ours("qwen3", shift, seed=14)
    B, L = 3, 20
    g = torch.Generator().manual_seed(15)
    x = tokens_for(model, (B, L), seed=16)
    need = torch.rand(B, L, generator=g) < 0.3
    positions = torch.stack([torch.randperm(L, generator=g)[:5].sort().values for _ in range(B)])  # [B, 5]
    positions[0, 0] = 0  # position 0 (no predecessor for a shift model)
    positions[0] = positions[0].sort().values
    with torch.no_grad():
        context = model.new_kv_cache(B, max_len=L)
        full = model.refine_forward(x, context)
        same(full, model(x))
        same(model.refine_forward(x, context, logit_positions=need), full[need])
        part = model.refine_forward(x, context, positions)  # nothing changed: exact
        same(part, full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1])))
        pneed = need.gather(1, positions)
        same(model.refine_forward(x, context, positions, logit_positions=pneed), part[pneed])
        before = context.k.clone()
        changed = x.scatter(1, positions, tokens_for(model, positions.shape, seed=17))
        model.refine_forward(changed, context, positions, write=torch.zeros_like(positions, dtype=torch.bool))
        assert torch.equal(context.k, before)


@pytest.mark.parametrize("shift", [True, False])
def test_refine_forward_with_one_layer_is_exact_after_refills(shift):
    """One layer: every stored K/V depends on its own token only, so re-running the refilled
    positions (and, with shift, their predecessors) is the exact global forward."""
    model = ours_from(hf_model("qwen2", seed=18, num_hidden_layers=1), shift)
    B, L = 2, 19
    g = torch.Generator().manual_seed(19)
    x = tokens_for(model, (B, L), seed=20, masked=0.3)
    positions = torch.stack([torch.randperm(L, generator=g)[:7].sort().values for _ in range(B)])
    with torch.no_grad():
        context = model.new_kv_cache(B, max_len=L)
        model.refine_forward(x, context)
        changed = x.scatter(1, positions, tokens_for(model, positions.shape, seed=21))
        part = model.refine_forward(changed, context, positions)
        exact = model(changed)
    same(part, exact.gather(1, positions[..., None].expand(-1, -1, exact.shape[-1])))


@pytest.mark.parametrize("shift", [True, False])
def test_logit_positions_give_the_dense_rows(shift):
    model = random_ours("llama", shift, seed=22)
    g = torch.Generator().manual_seed(23)
    x = tokens_for(model, (3, 22), seed=24)
    need = torch.rand(3, 22, generator=g) < 0.4
    with torch.no_grad():
        for kwargs in ({}, {"block_size": 4}):
            same(model(x, logit_positions=need, **kwargs), model(x, **kwargs)[need])
        cache = model.new_kv_cache(3, max_len=22)
        model.commit(x[:, :8], cache, block_size=4)
        block, nb = x[:, 8:12], need[:, 8:12]
        same(model.decode(block, cache, logit_positions=nb), model.decode(block, cache)[nb])
    with pytest.raises(ValueError, match="logit_positions"):
        model(x, logit_positions=need[:, :5])
    with pytest.raises(ValueError, match="logit_positions"):
        model(x, x0=x, block_size=4, logit_positions=need)


def test_a_shift_model_needs_its_own_cache():
    model = random_ours("qwen3", shift=True)
    from did_engine.modeling.kv_cache import BlockKVCache

    cfg = model.config
    plain = BlockKVCache(cfg.num_hidden_layers, 1, 8, cfg.num_key_value_heads, cfg.head_dim)
    assert isinstance(model.new_kv_cache(1), LastHiddenKVCache)
    assert type(random_ours("qwen3", shift=False).new_kv_cache(1)) is BlockKVCache
    with pytest.raises(ValueError, match="LastHiddenKVCache"):
        model.decode(tokens_for(model, (1, 4)), plain)


# -- precision, gradients -----------------------------------------------------------------


def test_bfloat16_inference_is_close_to_float32():
    model = random_ours("qwen3", shift=True, seed=25)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    x = tokens_for(model, (2, 20))
    with torch.no_grad():
        ref = model(x, block_size=4).double()
        low = model.to(torch.bfloat16)
        out = low(x, block_size=4).double()
        cache = low.new_kv_cache(2, max_len=20)
        assert cache.k.dtype == torch.bfloat16 and cache.last_hidden.dtype == torch.bfloat16
        low.commit(x[:, :16], cache, block_size=4)
        dec = low.decode(x[:, 16:], cache).double()
    scale = ref.abs().max()
    for got, want in ((out, ref), (dec, ref[:, 16:])):
        assert (got - want).abs().max() / scale < 0.03
        assert (got.softmax(-1) - want.softmax(-1)).abs().max() < 0.02


def test_gradients_of_the_shift_training_forward_match_finite_differences():
    model = ours_from(hf_model("qwen3", seed=26, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=8, num_hidden_layers=1, vocab_size=11), True).double()
    x0 = tokens_for(model, (2, 7), seed=27)
    xt = tokens_for(model, (2, 7), seed=27, masked=0.5)
    names = ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.q_norm.weight",
             "model.embed_tokens.weight"]
    params = dict(model.named_parameters())

    def loss(*tensors):
        out = torch.func.functional_call(model, dict(zip(names, tensors)), (xt,), {"x0": x0, "block_size": 3})
        return out.logsumexp(-1).sum()

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-4, fast_mode=True)


def test_every_parameter_gets_a_gradient():
    model = random_ours("qwen2", shift=True).train()
    x0 = tokens_for(model, (2, 12))
    xt = tokens_for(model, (2, 12), masked=0.5)
    model(xt, x0=x0, block_size=4).logsumexp(-1).mean().backward()
    # The differentiable block-causal forward too (dense-mask SDPA instead of the op).
    model(x0, block_size=4).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# -- checkpoints, config -------------------------------------------------------------------


@pytest.mark.parametrize("kind,shift", [("llama", True), ("qwen3", False)])
def test_save_load_round_trip_is_exact(tmp_path, kind, shift):
    model = random_ours(kind, shift, block_size=5)
    model.config.extra["note"] = "kept"
    model.save_pretrained(tmp_path)
    from did_engine.modeling import checkpoint

    # checkpoint.load_pretrained reads either class through its config_class hook
    for loaded in (LlamaBlockDiffusionLM.from_pretrained(tmp_path), load_model(tmp_path),
                   checkpoint.load_pretrained(LlamaBlockDiffusionLM, tmp_path)):
        assert isinstance(loaded, LlamaBlockDiffusionLM) and loaded.config == model.config
        assert list(loaded.state_dict()) == list(model.state_dict())
        for name, t in model.state_dict().items():
            assert torch.equal(t, loaded.state_dict()[name]), name
    header = json.load(open(tmp_path / "config.json"))
    assert header["format"] == "did_engine" and header["model_class"] == "LlamaBlockDiffusionLM"
    assert ("lm_head.weight" in model.state_dict()) == (not model.config.tie_word_embeddings)
    from did_engine.modeling import BlockDiffusionLM

    with pytest.raises(CheckpointError, match="LlamaBlockDiffusionLM.*load_model"):
        BlockDiffusionLM.from_pretrained(tmp_path)
    dit_dir = tmp_path / "dit"
    BlockDiffusionLM(vocab_size=37, model_length=24, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4).save_pretrained(
        dit_dir)
    with pytest.raises(CheckpointError, match="'BlockDiffusionLM' checkpoint, not a LlamaBlockDiffusionLM"):
        LlamaBlockDiffusionLM.from_pretrained(dit_dir)
    with pytest.raises(CheckpointError, match="unknown model config keys 'n_layers'"):
        header["config"]["n_layers"] = 3
        json.dump(header, open(tmp_path / "config.json", "w"))
        LlamaBlockDiffusionLM.from_pretrained(tmp_path)


def test_load_model_still_loads_the_dit(tmp_path):
    from did_engine.modeling import BlockDiffusionLM

    fixture = BD3LM_FIXTURE
    assert type(load_model(fixture)) is BlockDiffusionLM
    BlockDiffusionLM(vocab_size=37, model_length=24, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4).save_pretrained(
        tmp_path)
    assert "model_class" not in json.load(open(tmp_path / "config.json"))  # the DiT's files are unchanged
    assert type(load_model(tmp_path)) is BlockDiffusionLM


@pytest.mark.parametrize("bad, fragment", [
    (dict(num_key_value_heads=3), r"num_key_value_heads = 3: must divide num_attention_heads 4"),
    (dict(head_dim=7), r"head_dim = 7: rotary embeddings need an even head_dim"),
    (dict(mask_id=61), r"mask_id = 61: must be a token id below vocab_size 61"),
    (dict(block_size=65), r"block_size = 65: must not exceed model_length 64"),
    (dict(logit_shift=1), r"logit_shift = 1: must be true or false"),
    (dict(rope_theta=float("nan")), r"rope_theta = nan: must be a finite number"),
    (dict(hidden_size=True), r"hidden_size = True: must be an integer"),
    (dict(vocab_size=4_000_000, hidden_size=16384, num_hidden_layers=512), r"asks for about"),
])
def test_config_values_are_checked_before_anything_is_allocated(bad, fragment):
    cfg = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, model_length=64, mask_id=60)
    with pytest.raises(UserError, match=fragment):
        LlamaBlockConfig(**{**cfg, **bad})
    with pytest.raises(UserError, match="lacks mask_id"):
        LlamaBlockConfig.from_dict({k: v for k, v in cfg.items() if k != "mask_id"})


# -- the sampler runs the model unchanged ---------------------------------------------------


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("prompt", [None, [5, 9, 2, 7, 1, 3]])
def test_sampler_draft_with_the_cache_equals_the_uncached_block_causal_draft(shift, prompt):
    """The sampler drafts (and refines) with the model unchanged: its cached draft equals a
    draft from block-causal forwards over everything so far (no cache, no cached last
    hidden state, no fused commit), with and without a prompt, shift or not."""
    from support.uncached import UncachedModel

    from did_engine.sampling import generate

    model = random_ours("qwen3", shift, seed=28, block_size=4)
    kwargs = dict(batch_size=2, length=22, temperature=0, strategy="first_hitting", stages=[(None, 0.3, 3)],
                  prompt=None if prompt is None else torch.tensor(prompt))
    cached = generate(model, generator=torch.Generator().manual_seed(3), **kwargs)
    uncached = generate(UncachedModel(model), generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(cached.tokens, uncached.tokens) and (cached.tokens != model.mask_id).all()
    same(cached.confidence, uncached.confidence)
    if prompt is not None:
        assert cached.nfe["draft"]["commit"] == 1  # the prompt's whole block, prefilled
