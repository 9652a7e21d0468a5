"""BlockDiffusionLM: BD3-LM equivalence, agreement of its forwards, cache, checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from did_engine.diffusion import subs_log_probs
from did_engine.modeling import BlockDiffusionLM, ModelConfig
from did_engine.modeling.checkpoint import CheckpointError
from did_engine.modeling.layers import apply_rotary, block_diffusion_mask
from support import BD3LM_FIXTURE

FIXTURE = BD3LM_FIXTURE


@pytest.fixture(scope="module")
def bd3lm_tiny():
    model = BlockDiffusionLM.from_pretrained(FIXTURE)
    return model, load_file(os.path.join(FIXTURE, "io.safetensors"))


def random_model(seed=0, std=0.3, **overrides) -> BlockDiffusionLM:
    """A model with every parameter random (adaLN and output layers are not left at zero)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=37, model_length=24, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0)
    model = BlockDiffusionLM(ModelConfig(**{**cfg, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, std)
    return model.eval()


# -- equivalence with the BD3-LM reference implementation --------------------------------


def test_bd3lm_config_and_metadata_are_read(bd3lm_tiny):
    model, _ = bd3lm_tiny
    cfg = model.config
    assert (cfg.vocab_size, cfg.model_length, cfg.hidden_dim, cfg.n_blocks, cfg.n_heads, cfg.block_size) == \
        (67, 32, 64, 2, 4, 4)
    assert cfg.mask_id == 66
    assert cfg.extra["sampling_eps_min"] == pytest.approx(0.3) and cfg.extra["sampling_eps_max"] == pytest.approx(0.8)


def test_bd3lm_training_logits(bd3lm_tiny):
    model, io = bd3lm_tiny
    with torch.no_grad():
        logits = model(io["xt"], x0=io["x0"], block_size=4, sigma=io["sigma"])
    assert (logits - io["train_logits"]).abs().max() <= 1e-5


def test_bd3lm_block_causal_logits(bd3lm_tiny):
    model, io = bd3lm_tiny
    with torch.no_grad():
        logits = model(io["sample_prefix_input"], block_size=4)
    assert (logits - io["sample_prefix_logits"]).abs().max() <= 1e-5


def test_bd3lm_cache_decode_logits(bd3lm_tiny):
    model, io = bd3lm_tiny
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        model.commit(io["x0"][:, 0:4], cache)
        model.commit(io["x0"][:, 4:8], cache)
        logits = model.decode(io["cache_decode_input"], cache)
    assert cache.lengths.tolist() == [8, 8]
    assert (logits - io["cache_decode_logits"]).abs().max() <= 1e-5


# -- the forwards agree with each other on random configurations --------------------------


@pytest.mark.parametrize("overrides,block", [
    (dict(), 4),
    (dict(n_heads=1), 2),
    (dict(n_heads=2, adaln=False), 3),
    (dict(time_conditioning=True, n_blocks=3), 1),
    (dict(model_length=20, hidden_dim=48, n_heads=3), 5),
])
def test_decode_equals_block_causal_equals_training_rows(overrides, block):
    model = random_model(**overrides)
    L, V, mask_id = model.config.model_length, model.config.vocab_size, model.config.mask_id
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, V - 1, (3, L), generator=g)
    xt = torch.where(torch.rand(3, L, generator=g) < 0.5, torch.full_like(x0, mask_id), x0)
    sigma = torch.rand(3, generator=g)
    with torch.no_grad():
        train = model(xt, x0=x0, block_size=block, sigma=sigma)
        cache = model.new_kv_cache(3, max_len=L)
        for start in range(0, L, block):
            end = min(start + block, L)
            # x_t block j after clean blocks < j: the same row in all three forwards.
            prefix = torch.cat([x0[:, :start], xt[:, start:end]], dim=1)
            causal = model(prefix, block_size=block, sigma=sigma)[:, start:end]
            decoded = model.decode(xt[:, start:end], cache, sigma=sigma)
            torch.testing.assert_close(decoded, causal, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(decoded, train[:, start:end], atol=2e-5, rtol=1e-5)
            model.commit(x0[:, start:end], cache, sigma=sigma)


def test_training_forward_with_full_block_is_the_global_forward():
    model = random_model()
    x0 = torch.randint(0, 36, (2, 24))
    xt = x0.masked_fill(torch.rand(2, 24) < 0.5, 36)
    with torch.no_grad():
        torch.testing.assert_close(model(xt, x0=x0, block_size=24), model(xt))
        # Block-causal with one block covering everything is global too.
        torch.testing.assert_close(model(xt, block_size=24), model(xt), atol=2e-5, rtol=1e-5)


def test_block_diffusion_mask_against_its_definition():
    L, b = 7, 3
    mask = block_diffusion_mask(L, b)
    for q in range(2 * L):
        for k in range(2 * L):
            q_x0, k_x0 = q >= L, k >= L
            qb, kb = (q % L) // b, (k % L) // b
            want = (qb == kb and q_x0 == k_x0) or (not q_x0 and k_x0 and qb > kb) or (q_x0 and k_x0 and qb >= kb)
            assert bool(mask[q, k]) == want, (q, k)


def test_prompt_commit_is_the_block_causal_prefill():
    model = random_model()
    tokens = torch.randint(0, 36, (2, 20))
    with torch.no_grad():
        cache = model.new_kv_cache(2, max_len=24)
        model.commit(tokens[:, :16], cache, block_size=4)  # 4 blocks in one call
        decoded = model.decode(tokens[:, 16:20], cache)
        causal = model(tokens, block_size=4)[:, 16:20]
    torch.testing.assert_close(decoded, causal, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("P,block", [(16, 4), (18, 4), (15, 5), (20, 1)])
def test_prompt_prefill_in_one_forward_equals_block_by_block_commits(P, block):
    """One block-causal forward into an empty cache == committing the prompt block by block
    (the same attention, other kernels: equal up to float32 rounding), including a short last
    block; a non-empty cache is filled block by block. The return value counts forwards."""
    model = random_model(time_conditioning=True)
    tokens = torch.randint(0, 36, (3, 24))
    sigma = torch.rand(3)
    with torch.no_grad():
        one, blocks = model.new_kv_cache(3, max_len=24), model.new_kv_cache(3, max_len=24)
        assert model.commit(tokens[:, :P], one, sigma=sigma, block_size=block) == 1
        model.prefill_in_one_pass = False  # an instance attribute over the class's
        assert model.commit(tokens[:, :P], blocks, sigma=sigma, block_size=block) == -(-P // block)
        assert torch.equal(one.lengths, blocks.lengths) and torch.equal(one.offset, blocks.offset)
        for got, want in ((one.k[:, :, :P], blocks.k[:, :, :P]), (one.v[:, :, :P], blocks.v[:, :, :P])):
            torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)
        rest = tokens[:, P : P + 4]
        torch.testing.assert_close(model.decode(rest, one, sigma=sigma), model.decode(rest, blocks, sigma=sigma),
                                   atol=2e-5, rtol=1e-5)
        del model.prefill_in_one_pass
        # Into a non-empty cache: block by block, as many forwards as blocks.
        assert model.commit(tokens[:, P : P + 2 * block], one, sigma=sigma, block_size=block) == 2


def test_a_long_prompt_is_prefilled_in_one_forward_by_the_sampler():
    from did_engine.sampling import generate

    model = random_model()
    result = generate(model, 2, prompt=torch.randint(0, 36, (14,)), length=24, block_size=4, stages=[])
    assert result.nfe["draft"]["commit"] == 1  # 3 whole prompt blocks, one forward


def test_decode_does_not_change_the_cache():
    model = random_model()
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        model.commit(torch.randint(0, 36, (2, 4)), cache)
        before = (cache.k.clone(), cache.v.clone(), cache.lengths.clone())
        model.decode(torch.randint(0, 37, (2, 4)), cache)
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1]) and torch.equal(cache.lengths, before[2])


@pytest.mark.parametrize("overrides,block,n2", [
    (dict(), 4, 4),
    (dict(n_heads=1, adaln=False), 3, 1),  # a short last block after a full one
    (dict(time_conditioning=True, n_blocks=3), 5, 5),
])
def test_commit_and_decode_equals_commit_then_decode(overrides, block, n2):
    """The fused forward leaves the cache commit() leaves and returns decode()'s logits,
    at every block of a sequence that overflows the cache (the sliding window included)."""
    model = random_model(seed=3, **overrides)
    mask_id = model.config.mask_id
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, mask_id, (3, 40), generator=gen)
    xt = x0.masked_fill(torch.rand(3, 40, generator=gen) < 0.5, mask_id)
    sigma = torch.rand(3, generator=gen)
    with torch.no_grad():
        fused, split = model.new_kv_cache(3, max_len=2 * block + 1), model.new_kv_cache(3, max_len=2 * block + 1)
        model.commit(x0[:, :block], fused, sigma=sigma)
        model.commit(x0[:, :block], split, sigma=sigma)
        for start in range(block, 40 - block - n2 + 1, block):
            clean, noisy = x0[:, start : start + block], xt[:, start + block : start + block + n2]
            need = noisy == mask_id
            got = model.commit_and_decode(clean, noisy, fused, sigma=sigma)
            model.commit(clean, split, sigma=sigma)
            want = model.decode(noisy, split, sigma=sigma)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            for name in ("lengths", "offset"):
                assert torch.equal(getattr(fused, name), getattr(split, name)), name
            n = int(split.lengths[0])
            torch.testing.assert_close(fused.k[:, :, :n], split.k[:, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fused.v[:, :, :n], split.v[:, :, :n], atol=1e-5, rtol=1e-5)
            # Logits at some positions only: the dense rows. Run on a copy (the call commits).
            copy = model.new_kv_cache(3, max_len=2 * block + 1).copy_(fused)
            packed = model.commit_and_decode(x0[:, start + block : start + 2 * block], noisy, copy, sigma=sigma,
                                             logit_positions=need)
            model.commit(x0[:, start + block : start + 2 * block], split, sigma=sigma)
            torch.testing.assert_close(packed, model.decode(noisy, split, sigma=sigma)[need], atol=2e-5, rtol=1e-5)
            # Undo that extra commit on the reference cache, so the loop's caches stay equal.
            split.copy_(fused)
        assert int(fused.offset[0]) > 0  # the window slid
    with pytest.raises(ValueError, match="logit_positions"):
        model.commit_and_decode(x0[:, :block], xt[:, :n2], fused, logit_positions=torch.ones(3, n2 + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch"):
        model.commit_and_decode(x0[:2, :block], xt[:2, :n2], fused)


def test_refine_forward_full_pass_is_the_global_forward_and_partial_passes_reuse_it():
    model = random_model(seed=7, time_conditioning=True)
    B, L, mask_id = 3, 24, model.config.mask_id
    gen = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, mask_id, (B, L), generator=gen)
    need = torch.rand(B, L, generator=gen) < 0.3
    sigma = torch.rand(B, generator=gen)
    positions = torch.stack([torch.randperm(L, generator=gen)[:5].sort().values for _ in range(B)])  # [B, 5]
    with torch.no_grad():
        context = model.new_kv_cache(B, max_len=L)
        full = model.refine_forward(tokens, context, sigma=sigma)
        torch.testing.assert_close(full, model(tokens, sigma=sigma), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.refine_forward(tokens, context, sigma=sigma, logit_positions=need),
                                   full[need], atol=1e-5, rtol=1e-5)
        # Nothing changed since the K/V were stored: a partial pass is exact.
        part = model.refine_forward(tokens, context, positions, sigma=sigma)
        torch.testing.assert_close(part, full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1])),
                                   atol=1e-5, rtol=1e-5)
        # Re-fill the chosen positions: layer 0's K/V depend on a token alone, so after the
        # partial pass they equal a fresh full pass's everywhere; deeper layers keep the
        # other positions' stale K/V (the approximation).
        changed = tokens.scatter(1, positions, torch.randint(0, mask_id, positions.shape, generator=gen))
        model.refine_forward(changed, context, positions, sigma=sigma)
        fresh = model.new_kv_cache(B, max_len=L)
        model.refine_forward(changed, fresh, sigma=sigma)
        torch.testing.assert_close(context.k[0], fresh.k[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(context.v[0], fresh.v[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(context.k[1], fresh.k[1], atol=1e-4)
        # write=False rows are computed but leave the context alone (padding in the sampler).
        before = context.k.clone()
        model.refine_forward(changed, context, positions, write=torch.zeros_like(positions, dtype=torch.bool))
        assert torch.equal(context.k, before)
    with pytest.raises(ValueError, match="positions"):
        model.refine_forward(tokens, context, positions + L)
    with pytest.raises(ValueError, match="context"):
        model.refine_forward(tokens, model.new_kv_cache(B, max_len=L - 1))


def test_refine_forward_with_one_layer_is_exact_after_refills():
    """With one layer every stored K/V depends on its own token only: re-running the re-filled
    positions against the others' stored K/V is then the exact global forward."""
    model = random_model(seed=9, n_blocks=1)
    B, L, mask_id = 2, 24, model.config.mask_id
    gen = torch.Generator().manual_seed(10)
    tokens = torch.randint(0, mask_id + 1, (B, L), generator=gen)
    positions = torch.stack([torch.randperm(L, generator=gen)[:7].sort().values for _ in range(B)])
    with torch.no_grad():
        context = model.new_kv_cache(B, max_len=L)
        model.refine_forward(tokens, context)
        changed = tokens.scatter(1, positions, torch.randint(0, mask_id, positions.shape, generator=gen))
        part = model.refine_forward(changed, context, positions)
        exact = model(changed)
    torch.testing.assert_close(part, exact.gather(1, positions[..., None].expand(-1, -1, exact.shape[-1])),
                               atol=1e-5, rtol=1e-5)


# -- cache capacity and the sliding window -------------------------------------------------


def test_cache_reports_memory_and_rejects_oversized_blocks():
    model = random_model()
    cache = model.new_kv_cache(3, max_len=12)
    cfg = model.config
    assert cache.nbytes >= 2 * cfg.n_blocks * 3 * 12 * cfg.hidden_dim * 4
    assert cache.capacity == 12 and "BlockKVCache" in repr(cache)
    with pytest.raises(ValueError, match="capacity"):
        model.decode(torch.randint(0, 36, (3, 13)), cache)
    with pytest.raises(ValueError, match="batch"):
        model.decode(torch.randint(0, 36, (2, 4)), cache)


def test_sliding_window_drops_whole_blocks_and_keeps_relative_positions():
    model = random_model()  # block_size 4
    cache = model.new_kv_cache(2, max_len=12)
    tokens = torch.randint(0, 36, (2, 24))
    with torch.no_grad():
        for start in range(0, 20, 4):
            model.commit(tokens[:, start : start + 4], cache)
        assert cache.lengths.tolist() == [12, 12]  # blocks 2, 3, 4 kept
        assert cache.offset.tolist() == [8, 8]
        logits = model.decode(tokens[:, 20:24], cache)
        # Re-number the window from 0 (what BD3-LM does): rotate the cached keys back by 8
        # positions; attention depends only on distances, so the logits are unchanged.
        angle = -8 * model.rotary_emb.inv_freq
        cos, sin = angle.cos()[None, None, None, :], angle.sin()[None, None, None, :]
        for layer in range(cache.k.shape[0]):
            cache.k[layer] = apply_rotary(cache.k[layer], cos, sin)
        cache.offset.zero_()
        rebased = model.decode(tokens[:, 20:24], cache)
    torch.testing.assert_close(logits, rebased, atol=2e-5, rtol=1e-5)


def test_a_checkpoint_path_with_a_nul_byte_is_a_checkpoint_error():
    from did_engine.modeling.checkpoint import open_regular_file

    with pytest.raises(CheckpointError):
        BlockDiffusionLM.from_pretrained("/tmp/a\x00b")
    with pytest.raises(CheckpointError, match="not a usable path"):
        open_regular_file("/tmp/a\x00b/config.json")


def test_commits_read_lengths_back_only_when_a_row_might_overflow(monkeypatch):
    """Inside the window a commit never reads the lengths back to the host (a GPU would
    synchronise); near the edge it reads them once per commit, and rows of different lengths
    slide by their own amounts."""
    model = random_model()  # block_size 4
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or tolist(self))
    cache = model.new_kv_cache(2, max_len=16)
    tokens = torch.randint(0, 36, (2, 40))
    with torch.no_grad():
        for start in range(0, 16, 4):
            model.commit(tokens[:, start : start + 4], cache)
        assert reads == []  # 16 tokens fit: nothing read
        model.commit(tokens[:, 16:20], cache)
        assert len(reads) == 1
        assert tolist(cache.lengths) == [16, 16] and tolist(cache.offset) == [4, 4]
        # Rows of different lengths (a context that was set by hand): each slides its own way.
        short = model.new_kv_cache(2, max_len=16)
        short.copy_(cache)
        short.set_lengths([16, 8])
        model.commit(tokens[:, 20:24], short)
        assert tolist(short.lengths) == [16, 12] and tolist(short.offset) == [8, 4]


# -- precision and gradients -----------------------------------------------------------------


def test_bfloat16_inference_is_close_to_float32():
    # Weights rounded to bf16 first, so the comparison isolates bf16 arithmetic.
    model = random_model(std=0.15)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    tokens = torch.randint(0, 37, (2, 24))
    with torch.no_grad():
        ref = model(tokens, block_size=4).double()
        low = model.to(torch.bfloat16)
        assert low.rotary_emb.inv_freq.dtype == torch.float32  # frequencies are never rounded
        out = low(tokens, block_size=4).double()
        cache = low.new_kv_cache(2, max_len=24)
        assert cache.k.dtype == torch.bfloat16
        low.commit(tokens[:, :20], cache, block_size=4)
        dec = low.decode(tokens[:, 20:], cache).double()
    scale = ref.abs().max()
    for got, want in ((out, ref), (dec, ref[:, 20:])):
        assert (got - want).abs().max() / scale < 0.02
        assert (got.softmax(-1) - want.softmax(-1)).abs().max() < 0.01


def test_gradients_of_the_training_forward_match_finite_differences():
    model = random_model(hidden_dim=16, cond_dim=8, n_heads=2, n_blocks=1, model_length=8, vocab_size=11).double()
    x0 = torch.randint(0, 10, (2, 8))
    xt = x0.masked_fill(torch.rand(2, 8) < 0.5, 10)
    names = ["blocks.0.attn_qkv.weight", "blocks.0.adaLN_modulation.bias", "vocab_embed.embedding"]
    params = dict(model.named_parameters())

    def loss(*tensors):
        out = torch.func.functional_call(model, dict(zip(names, tensors)), (xt,), {"x0": x0, "block_size": 2})
        return subs_log_probs(out, xt, 10).masked_fill(torch.isinf(subs_log_probs(out, xt, 10)), 0).double().sum()

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-4, fast_mode=True)


def test_every_parameter_gets_a_gradient():
    model = random_model(dropout=0.1).train()
    x0 = torch.randint(0, 36, (2, 24))
    xt = x0.masked_fill(torch.rand(2, 24) < 0.5, 36)
    logits = model(xt, x0=x0, block_size=4, sigma=torch.rand(2))
    logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("sigma_map") and not model.config.time_conditioning:
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# -- SUBS ---------------------------------------------------------------------------------------


def test_subs_never_predicts_the_mask_and_carries_unmasked_tokens():
    logits = torch.randn(2, 5, 7)
    xt = torch.tensor([[6, 1, 6, 3, 6], [0, 6, 6, 6, 2]])
    lp = subs_log_probs(logits, xt, mask_id=6)
    assert torch.isneginf(lp[..., 6]).all()
    masked = xt == 6
    torch.testing.assert_close(lp[masked].exp().sum(-1), torch.ones(int(masked.sum())))
    assert (lp[~masked].argmax(-1) == xt[~masked]).all() and (lp[~masked].max(-1).values == 0).all()


# -- checkpoints -------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path):
    model = random_model(time_conditioning=True)
    model.config.extra["note"] = "kept"
    model.save_pretrained(tmp_path)
    loaded = BlockDiffusionLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    assert json.load(open(tmp_path / "config.json"))["format"] == "did_engine"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def _tamper(tmp_path, edit):
    model = random_model()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    _tamper(tmp_path, lambda t: t.pop("blocks.1.attn_out.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: blocks\.1\.attn_out\.weight"):
        BlockDiffusionLM.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    _tamper(tmp_path, lambda t: t.update({"blocks.7.extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: blocks\.7\.extra"):
        BlockDiffusionLM.from_pretrained(tmp_path)


def test_mis_shaped_tensor_is_named(tmp_path):
    _tamper(tmp_path, lambda t: t.update({"output_layer.linear.bias": torch.zeros(5)}))
    with pytest.raises(CheckpointError, match=r"output_layer\.linear\.bias: checkpoint \(5,\)"):
        BlockDiffusionLM.from_pretrained(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        BlockDiffusionLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad, fragment", [
    (dict(dropout=1.5), r"dropout = 1\.5: must be a number in \[0, 1\)"),
    (dict(n_heads=5), r"n_heads = 5: must divide hidden_dim 32"),
    (dict(n_heads=32), r"head_dim 1"),
    (dict(hidden_dim=0), r"hidden_dim = 0: must be in \[1, "),
    (dict(n_blocks=True), r"n_blocks = True: must be an integer, not bool"),
    (dict(vocab_size=37.0), r"vocab_size = 37\.0: must be an integer, not float"),
    (dict(rotary_base=float("inf")), r"rotary_base = inf: must be a finite number"),
    (dict(block_size=25), r"block_size = 25: must not exceed model_length 24"),
    (dict(adaln=1), r"adaln = 1: must be true or false"),
    (dict(hidden_dim=32768, n_heads=256, n_blocks=1024), r"asks for about 1\.3\d*e\+13 weights"),
])
def test_config_values_are_checked_before_anything_is_allocated(bad, fragment):
    from did_engine.errors import UserError

    cfg = dict(vocab_size=37, model_length=24, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4)
    with pytest.raises(UserError, match=fragment):
        ModelConfig(**{**cfg, **bad})
    with pytest.raises(UserError, match=fragment):  # the same checks guard the model's constructor
        BlockDiffusionLM(**{**cfg, **bad})


@pytest.mark.parametrize("preset", ["tiny", "mini", "small"])
@pytest.mark.parametrize("adaln", [True, False])
def test_weight_estimate_is_the_count_with_adaln_and_a_bound_without(preset, adaln):
    from did_engine.modeling.config import PRESETS, estimated_weight_elements

    config = ModelConfig(**{**PRESETS[preset], "adaln": adaln})
    with torch.device("meta"):  # counted without allocating (small has 170M weights)
        count = BlockDiffusionLM(config).num_parameters()
    estimate = estimated_weight_elements(config)
    assert estimate == count if adaln else estimate > count


def test_unknown_keys_are_refused_in_our_format_and_kept_in_bd3lm_s(tmp_path):
    random_model().save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        raw = json.load(f)
    raw["config"]["n_layer"] = 3  # a typo of n_blocks would otherwise silently keep the default
    with open(tmp_path / "config.json", "w") as f:
        json.dump(raw, f)
    with pytest.raises(CheckpointError, match=r"config\.json: unknown model config keys 'n_layer'"):
        BlockDiffusionLM.from_pretrained(tmp_path)
    model = BlockDiffusionLM.from_pretrained(FIXTURE)  # BD3LMConfig's own fields stay as metadata
    assert model.config.extra["var_min"] is True and model.config.extra["source_format"] == "bd3lm"


@pytest.mark.parametrize("adaln", [True, False])
def test_logit_positions_give_the_dense_rows(adaln):
    """decode / block-causal / global forwards with logit_positions = the dense logits' rows."""
    model = random_model(seed=5, adaln=adaln, time_conditioning=True)
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 36, (3, 24), generator=gen)
    need = torch.rand(3, 24, generator=gen) < 0.4
    sigma = torch.rand(3, generator=gen)
    with torch.no_grad():
        for kwargs in ({}, {"block_size": 4}):
            dense = model(tokens, sigma=sigma, **kwargs)
            packed = model(tokens, sigma=sigma, logit_positions=need, **kwargs)
            torch.testing.assert_close(packed, dense[need], rtol=1e-5, atol=1e-5)
        cache = model.new_kv_cache(3)
        model.commit(tokens[:, :8], cache, block_size=4)
        block, need_block = tokens[:, 8:12], need[:, 8:12]
        dense = model.decode(block, cache, sigma=sigma)
        torch.testing.assert_close(model.decode(block, cache, sigma=sigma, logit_positions=need_block),
                                   dense[need_block], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="logit_positions"):
        model(tokens, logit_positions=need[:, :5])
    with pytest.raises(ValueError, match="logit_positions"):
        model(tokens, x0=tokens, block_size=4, logit_positions=need)
