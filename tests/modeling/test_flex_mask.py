"""The training forward's FlexAttention path (CUDA) against its dense-mask SDPA path (CPU).

The mask function is checked pair by pair against the dense mask and against the mask's
definition written out by hand; the block mask's tiles against the dense mask; the eager
FlexAttention forward against SDPA on a CPU (FlexAttention has no CPU backward); the
compile cache's labels with a compiler that fails. Compiled FlexAttention itself runs on
a CPU only in the slow test (inductor's C++ build takes minutes on 2 cores) and on CUDA.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask, flex_attention

from did_engine.errors import UserError
from did_engine.modeling import BlockDiffusionLM
from did_engine.modeling.layers import (TRAINING_ATTENTION_ENV, FlexTrainingAttention, _compile_flex_function,
                                        block_diffusion_mask, block_diffusion_mask_mod, resolve_training_attention)

# (L, block size): several blocks, L not a multiple of b, b = 1, b = L, one token.
SIZES = [(1, 1), (4, 2), (7, 3), (8, 4), (10, 4), (12, 12), (16, 1), (33, 8), (20, 7)]


def mask_by_definition(L: int, b: int) -> torch.Tensor:
    """DESIGN 1.1's three rules, one (query, key) pair at a time in plain Python."""
    out = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            q_x0, k_x0 = q >= L, k >= L
            qb, kb = (q - L * q_x0) // b, (k - L * k_x0) // b
            same_half_same_block = qb == kb and q_x0 == k_x0
            xt_sees_earlier_x0 = not q_x0 and k_x0 and qb > kb
            x0_sees_x0_so_far = q_x0 and k_x0 and qb >= kb
            out[q, k] = same_half_same_block or xt_sees_earlier_x0 or x0_sees_x0_so_far
    return out


@pytest.mark.parametrize("L,b", SIZES)
def test_mask_mod_on_every_pair_equals_the_dense_mask(L, b):
    # create_mask evaluates the mask_mod the way FlexAttention does (vmapped over indices).
    from_mod = create_mask(block_diffusion_mask_mod(L, b), 1, 1, 2 * L, 2 * L, device="cpu")[0, 0]
    want = mask_by_definition(L, b)
    assert torch.equal(block_diffusion_mask(L, b), want)
    assert torch.equal(from_mod, want)


@pytest.mark.parametrize("L,b", [(200, 4), (130, 16), (64, 64), (300, 7)])
def test_block_mask_keeps_exactly_the_tiles_with_a_visible_pair(L, b):
    """A 128 x 128 tile is computed iff some pair in it may attend: skipping one that has a
    visible pair drops keys; keeping an empty one only costs time, but shows a wrong mask."""
    flex = FlexTrainingAttention()
    block_mask = flex.block_mask(L, b, "cpu")
    assert flex.block_mask(L, b, "cpu") is block_mask  # cached per (L, b, device)
    tile = block_mask.BLOCK_SIZE[0]
    n = -(-2 * L // tile)
    dense = torch.zeros(n * tile, n * tile, dtype=torch.bool)
    dense[: 2 * L, : 2 * L] = block_diffusion_mask(L, b)
    any_visible = dense.view(n, tile, n, tile).any(dim=3).any(dim=1)  # [n, n]
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), any_visible)


def tiny_model(**overrides):
    torch.manual_seed(0)
    model = BlockDiffusionLM.from_preset("tiny", **overrides).eval()
    with torch.no_grad():  # non-trivial adaLN gates (they would start at zero in training)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def noisy_pair(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    L, mask_id = model.config.model_length, model.config.mask_id
    x0 = torch.randint(0, mask_id, (batch, L), generator=g)
    xt = torch.where(torch.rand(batch, L, generator=g) < 0.5, mask_id, x0)
    return xt, x0, torch.rand(batch, generator=g)


@pytest.mark.parametrize("block_size", [1, 3, 4, 5, 16])
def test_eager_flex_training_forward_equals_the_sdpa_path(block_size):
    model = tiny_model(time_conditioning=True)
    xt, x0, sigma = noisy_pair(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        model.training_attention = "sdpa"
        dense = model(xt, x0=x0, block_size=block_size, sigma=sigma)
        assert model.last_training_attention == "sdpa-dense"
        model.training_attention = "flex-eager"
        flex = model(xt, x0=x0, block_size=block_size, sigma=sigma)
        assert model.last_training_attention == "flex-eager"
    torch.testing.assert_close(flex, dense, atol=2e-5, rtol=1e-5)
    assert (flex - dense).abs().max() < 1e-3 * dense.abs().max()


def test_full_block_skips_the_x0_half_on_every_path():
    model = tiny_model()
    xt, x0, _ = noisy_pair(model)
    L = model.config.model_length
    with torch.no_grad():
        model.training_attention = "flex-eager"
        out = model(xt, x0=x0, block_size=L)
        assert model.last_training_attention is None  # no training attention ran: a global forward
        torch.testing.assert_close(out, model(xt))


def test_training_attention_choice():
    assert resolve_training_attention("auto", "cpu") == "sdpa"
    assert resolve_training_attention("auto", torch.device("cuda", 0)) == "flex"
    assert resolve_training_attention("flex", "cpu") == "flex"
    with pytest.raises(UserError, match="model.training_attention = 'fast'"):
        resolve_training_attention("fast", "cpu")


def test_training_attention_from_the_environment(monkeypatch):
    monkeypatch.setenv(TRAINING_ATTENTION_ENV, "flex-eager")
    assert resolve_training_attention(None, "cpu") == "flex-eager"
    assert resolve_training_attention("sdpa", "cpu") == "sdpa"  # the model's own setting wins
    monkeypatch.setenv(TRAINING_ATTENTION_ENV, "Flex")
    with pytest.raises(UserError, match=TRAINING_ATTENTION_ENV):
        resolve_training_attention(None, "cuda")
    monkeypatch.delenv(TRAINING_ATTENTION_ENV)
    assert resolve_training_attention(None, "cuda") == "flex"


def qkv(B=2, L=10, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 2 * L, H, D, generator=g) for _ in range(3)]


def dense_reference(q, k, v, L, b):
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~block_diffusion_mask(L, b), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


def test_a_failed_compilation_warns_and_is_labelled_eager():
    def broken_compiler(index):
        def fn(*args):
            raise RuntimeError("inductor: no C++ compiler")
        return fn

    flex = FlexTrainingAttention(compile_fn=broken_compiler)
    q, k, v = qkv()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        with pytest.warns(RuntimeWarning, match="EAGERLY.*no C\\+\\+ compiler|no C\\+\\+ compiler.*EAGERLY"):
            out = flex(q, k, v, 10, 3)
        assert flex.last_path == "flex-eager"
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # warned once per shape set, not per call
            again = flex(q, k, v, 10, 3)
        assert flex.last_path == "flex-eager"
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, 10, 3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, out)


def test_one_compiled_function_per_shape_set():
    made = []

    def counting_compiler(index):
        def fn(q, k, v, block_mask):
            return flex_attention(q, k, v, block_mask=block_mask)
        made.append(index)
        return fn

    flex = FlexTrainingAttention(compile_fn=counting_compiler)
    q, k, v = qkv()
    q2, k2, v2 = qkv(B=3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        for args in [(q, k, v, 10, 3), (q, k, v, 10, 3), (q2, k2, v2, 10, 3), (q, k, v, 10, 4), (q, k, v, 10, 3)]:
            out = flex(*args)
            assert flex.last_path == "flex-compiled"
            torch.testing.assert_close(out.double(), dense_reference(*args), atol=1e-5, rtol=1e-5)
    assert made == [0, 1, 2]  # (B=2, b=3), (B=3, b=3), (B=2, b=4)
    # Gradient mode is part of the shape set: a training step and an evaluation compile apart.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        flex(q, k, v, 10, 3)
    assert made == [0, 1, 2, 3]


def test_each_compiled_function_has_its_own_code_object():
    # dynamo keeps compiled entries per code object: separate objects, separate limits.
    first, second = _compile_flex_function(0), _compile_flex_function(1)
    codes = {f._torchdynamo_orig_callable.__code__ for f in (first, second)}
    assert len(codes) == 2


@pytest.mark.slow  # inductor builds C++ for FlexAttention: ~1-2 min on 2 cores
def test_compiled_flex_on_cpu_equals_the_sdpa_path():
    model = tiny_model(model_length=16)
    xt, x0, _ = noisy_pair(model, batch=2)
    with torch.no_grad():
        model.training_attention = "sdpa"
        dense = model(xt, x0=x0, block_size=3)
        model.training_attention = "flex"
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
            flex = model(xt, x0=x0, block_size=3)
    assert model.last_training_attention == "flex-compiled"
    torch.testing.assert_close(flex, dense, atol=2e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", [False, True])
def test_compiled_flex_on_cuda_matches_sdpa_forward_and_gradients(amp):
    """The GPU training path: loss and gradients of compiled FlexAttention against the
    dense-mask SDPA path on the same weights (fp32, and bf16 autocast with its tolerance)."""
    model = tiny_model(model_length=96, hidden_dim=128, n_heads=2).cuda().train()
    xt, x0, sigma = (t.cuda() for t in noisy_pair(model, batch=4))
    results = {}
    for path in ("sdpa", "flex"):
        model.training_attention = path
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            logits = model(xt, x0=x0, block_size=5, sigma=sigma)
        loss = logits.float().logsumexp(-1).mean()
        loss.backward()
        results[path] = (logits.float().detach(), [p.grad.clone() for p in model.parameters()])
    assert model.last_training_attention == "flex-compiled"
    (l_sdpa, g_sdpa), (l_flex, g_flex) = results["sdpa"], results["flex"]
    tol = 2e-2 if amp else 1e-4
    assert (l_flex - l_sdpa).norm() <= tol * l_sdpa.norm()
    for a, b in zip(g_flex, g_sdpa):
        assert (a - b).norm() <= 5 * tol * b.norm() + 1e-6
