"""block_causal_attention (CPU kernel) against the pure-PyTorch reference."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from did_engine import ops
from did_engine.ops.reference import reference_block_causal_attention

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
op = torch.ops.did_engine.block_causal_attention.default


def make_inputs(B, S, H, H_kv, D, dtype=torch.float32):
    """Random q [B,S,H,D], k/v [B,S,H_kv,D]."""
    q = torch.randn(B, S, H, D, dtype=dtype)
    k = torch.randn(B, S, H_kv, D, dtype=dtype)
    v = torch.randn(B, S, H_kv, D, dtype=dtype)
    return q, k, v


def check_against_reference(check, q, k, v, block_size, scale=None):
    out = ops.block_causal_attention(q, k, v, block_size, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    ref64 = reference_block_causal_attention(q.double(), k.double(), v.double(), block_size, scale=scale)
    ref_low = None if q.dtype == torch.float32 else reference_block_causal_attention(q, k, v, block_size, scale=scale)
    check(out, ref64, ref_low)


# (B, S, H, H_kv, D, block_size): S not a multiple of the block, causal (1), block >= S
# (bidirectional), blocks larger than a work chunk, GQA and plain heads.
SHAPES = [
    (1, 1, 1, 1, 16, 1),
    (2, 97, 12, 4, 64, 4),
    (1, 1025, 2, 2, 24, 16),
    (3, 33, 2, 1, 80, 1),
    (1, 50, 2, 2, 16, 100),
    (2, 200, 4, 2, 20, 70),
    (1, 3, 3, 3, 64, 2),
    (1, 97, 6, 2, 64, 97),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}S{}H{}Hkv{}D{}bs{}".format(*s))
def test_matches_reference(shape, dtype, check_lowp_error):
    *dims, block_size = shape
    check_against_reference(check_lowp_error, *make_inputs(*dims, dtype=dtype), block_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_explicit_scale(dtype, check_lowp_error):
    check_against_reference(check_lowp_error, *make_inputs(2, 37, 4, 2, 32, dtype=dtype), 5, scale=0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype, check_lowp_error):
    B, S, H, H_kv, D = 2, 97, 12, 4, 24
    q = torch.randn(B, H, S, D, dtype=dtype).transpose(1, 2)  # heads-major storage
    k = torch.randn(B, S + 3, H_kv, 2 * D, dtype=dtype)[:, 3:, :, :D]  # a slice
    v = torch.randn(D, B, S, H_kv, dtype=dtype).permute(1, 2, 3, 0)  # last dim strided
    assert not any(t.is_contiguous() for t in (q, k, v))
    check_against_reference(check_lowp_error, q, k, v, 8)


def test_block_one_is_causal_and_block_s_is_full():
    q, k, v = make_inputs(1, 40, 4, 2, 32)
    kr, vr = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    sdpa = lambda causal: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), is_causal=causal
    ).transpose(1, 2)
    torch.testing.assert_close(ops.block_causal_attention(q, k, v, 1), sdpa(True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.block_causal_attention(q, k, v, 40), sdpa(False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.block_causal_attention(q, k, v, 1000), sdpa(False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.block_causal_attention(q, k, v, 2**62), sdpa(False), atol=1e-5, rtol=1e-5)


def test_empty_inputs():
    assert ops.block_causal_attention(*make_inputs(0, 5, 2, 2, 8), 2).shape == (0, 5, 2, 8)
    assert ops.block_causal_attention(*make_inputs(2, 0, 2, 2, 8), 2).shape == (2, 0, 2, 8)


@pytest.mark.parametrize(
    "args",
    [
        (*make_inputs(2, 19, 12, 4, 64), 4),
        (*make_inputs(1, 7, 2, 2, 24, dtype=torch.bfloat16), 3),
        (*make_inputs(1, 40, 3, 1, 20, dtype=torch.float16), 100),
    ],
    ids=["f32-gqa", "bf16", "f16-full"],
)
def test_opcheck(args):
    torch.library.opcheck(op, args)
    torch.library.opcheck(op, (*args, 0.5))


# ---------------------------------------------------------------------------------------
# Invalid inputs raise ValueError naming the argument.

Q, K, V = make_inputs(2, 8, 4, 2, 16)


@pytest.mark.parametrize(
    "bad_args, match",
    [
        ((Q[0], K, V, 2), "q must be a 4-D"),
        ((Q, K[..., 0], V, 2), "k must be a 4-D"),
        ((Q, K, V[None], 2), "v must be a 4-D"),
        ((Q.double(), K, V, 2), "q must be float32, bfloat16 or float16"),
        ((Q, K.half(), V, 2), "k has dtype"),
        ((Q, K, V.bfloat16(), 2), "v has dtype"),
        ((Q, torch.randn(2, 8, 3, 16), torch.randn(2, 8, 3, 16), 2), "not a multiple"),
        ((Q, torch.randn(2, 9, 2, 16), V, 2), "k must be"),
        ((Q, torch.randn(2, 8, 2, 8), V, 2), "k must be"),
        ((Q, K, torch.randn(2, 8, 1, 16), 2), "v must have"),
        ((Q, K, V, 0), "block_size must be >= 1"),
        ((Q, K, V, -3), "block_size must be >= 1"),
        ((Q, K, V, 2, math.inf), "scale must be finite"),
    ],
)
def test_bad_inputs_raise_value_error(bad_args, match):
    with pytest.raises(ValueError, match=match):
        op(*bad_args)


# ---------------------------------------------------------------------------------------
# Fuzz. (The only function-scoped fixture is the autouse seed, harmless across examples.)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_against_reference(data, check_lowp_error):
    B = data.draw(st.integers(1, 2), label="B")
    S = data.draw(st.integers(1, 70), label="S")
    H_kv = data.draw(st.integers(1, 3), label="H_kv")
    group = data.draw(st.integers(1, 3), label="group")
    D = data.draw(st.integers(1, 40), label="D")
    block_size = data.draw(st.integers(1, 80), label="block_size")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    scale = data.draw(st.one_of(st.none(), st.floats(0.05, 2.0)), label="scale")
    q, k, v = make_inputs(B, S, H_kv * group, H_kv, D, dtype=dtype)
    check_against_reference(check_lowp_error, q, k, v, block_size, scale=scale)


def test_scale_beyond_float32_and_non_int_block_size_are_refused():
    q, k, v = make_inputs(1, 6, 2, 2, 8)
    for scale in (1e300, -1e39):
        with pytest.raises(ValueError, match="scale must fit in float32"):
            op(q, k, v, 2, scale)
    for block_size in (2.5, 2.0, True, "2", None):
        with pytest.raises(ValueError, match="block_size must be an int"):
            ops.block_causal_attention(q, k, v, block_size)
    # An exact integer of another type is not truncated, so it is accepted.
    assert torch.equal(ops.block_causal_attention(q, k, v, torch.tensor(3)), ops.block_causal_attention(q, k, v, 3))


# ---------------------------------------------------------------------------------------
# NaN and inf stay where they are: a non-finite value reaches exactly the outputs that see
# it; every other output is bit-equal to the clean run (kernel and reference alike).


def seen_by(shape, block_size, where, b0, p0, h0):
    """[B, S, H] bool: the outputs that see element (b0, p0, h0, :) of q, k or v."""
    B, S, H, H_kv = shape
    mask = torch.zeros(B, S, H, dtype=torch.bool)
    if where == "q":
        mask[b0, p0, h0] = True
    else:  # key/value p0 of kv head h0: every query of a block >= p0's, heads of its group
        group = H // H_kv
        first = p0 // block_size * block_size
        mask[b0, first:, h0 * group : (h0 + 1) * group] = True
    return mask


@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 6, 2, 20, 5), (1, 70, 2, 2, 64, 16), (2, 40, 24, 4, 16, 1)],
                         ids=["gqa-bs5", "bs16", "transposed-causal"])
def test_non_finite_values_stay_local(shape, dtype, where, special):
    B, S, H, H_kv, D, block_size = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, where)).encode()))  # same in every process
    q, k, v = make_inputs(B, S, H, H_kv, D, dtype=dtype)
    dirty = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    heads = H if where == "q" else H_kv
    b0, p0, h0, d0 = (int(torch.randint(0, m, (1,), generator=gen)) for m in (B, S, heads, D))
    dirty[where][b0, p0, h0, d0] = special
    mask = seen_by((B, S, H, H_kv), block_size, where, b0, p0, h0)

    for name, fn in [("kernel", op), ("reference", reference_block_causal_attention)]:
        cast = (lambda t: t) if name == "kernel" else (lambda t: t.double())
        clean = fn(cast(q), cast(k), cast(v), block_size)
        out = fn(cast(dirty["q"]), cast(dirty["k"]), cast(dirty["v"]), block_size)
        assert torch.equal(out[~mask], clean[~mask]), f"{name}: the value leaked to outputs that do not see it"
        # NaN anywhere and +-inf in a value make every output that sees them non-finite
        # (an inf key may instead only drop out of the softmax).
        if math.isnan(special) or where == "v":
            assert not torch.isfinite(out[mask]).all(dim=-1).any(), f"{name}: an output that sees it stayed finite"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keys_scoring_minus_inf_drop_out(dtype, check_lowp_error):
    # Keys 0..34 score -inf for every query (q > 0, a -inf element): whole key tiles of -inf
    # must not poison the running max (-inf - -inf = NaN) of the rows that see later,
    # finite keys; rows that see only those keys are NaN in the reference and the kernel.
    q, k, v = make_inputs(2, 70, 4, 2, 24, dtype=dtype)
    q = q.abs() + 0.1
    k[:, :35, :, 5] = -math.inf
    out = ops.block_causal_attention(q, k, v, 5)
    ref64 = reference_block_causal_attention(q.double(), k.double(), v.double(), 5)
    assert torch.isnan(ref64[:, :35]).all() and torch.isnan(out[:, :35]).all()
    ref_low = None if dtype == torch.float32 else reference_block_causal_attention(q, k, v, 5)[:, 35:]
    check_lowp_error(out[:, 35:], ref64[:, 35:], ref_low)
