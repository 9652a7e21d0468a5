"""block_causal_attention against the float64 reference, on every device (tests/ops/cases.py
says which and how to dry-run the CUDA cases on the CPU).

Tests without a ``device`` argument check the CPU kernel and the wrapper: argument errors,
fuzzing, special cases. The CUDA kernels' own paths and behaviours are in test_cuda_only.py.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from did_engine import ops
from did_engine.ops.reference import reference_block_causal_attention

from .cases import DEVICES, DTYPES, assert_flash_error_rule, causal_inputs, check_causal, shape_id

op = torch.ops.did_engine.block_causal_attention.default
SHAPE_ID = shape_id("B{}S{}H{}Hkv{}D{}bs{}")


# (B, S, H, H_kv, D, block_size): S not a multiple of the block (nor of the CUDA CTA tiles),
# causal (1), block >= S (bidirectional), blocks larger than a CPU work chunk, GQA and plain
# heads, CUDA tensor-core head dims 64/128 and FMA ones.
SHAPES = [
    (1, 1, 1, 1, 16, 1),
    (2, 97, 12, 4, 64, 4),
    (1, 1025, 2, 2, 24, 16),
    (3, 33, 2, 1, 80, 1),
    (1, 50, 2, 2, 16, 100),
    (2, 200, 4, 2, 20, 70),
    (1, 3, 3, 3, 64, 2),
    (1, 97, 6, 2, 64, 97),
    (1, 1025, 4, 4, 64, 16),
    (2, 200, 8, 2, 128, 64),
    (1, 130, 2, 2, 80, 7),
    (1, 33, 3, 1, 24, 1),
    (2, 50, 4, 4, 64, 1000),
    (1, 128, 2, 2, 128, 64),
    (1, 70, 2, 1, 256, 5),
    (2, 19, 2, 2, 1, 3),
    (1, 300, 6, 3, 64, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_ID)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device, shape, dtype):
    *dims, block_size = shape
    check_causal(*causal_inputs(*dims, dtype=dtype, device=device), block_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_explicit_scale(device, dtype):
    check_causal(*causal_inputs(2, 37, 4, 2, 32, dtype=dtype, device=device), 5, scale=0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_aligned_inputs_and_scale(device, dtype):
    B, S, H, H_kv, D = 2, 77, 4, 2, 64
    qkv = torch.randn(B, S, H + 2 * H_kv, D, dtype=dtype, device=device)  # views whose rows stay aligned
    check_causal(qkv[:, :, :H], qkv[:, :, H : H + H_kv], qkv[:, :, H + H_kv :], 8, scale=0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [24, 64])
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_unaligned_inputs(device, D, dtype):
    B, S, H, H_kv = 2, 97, 12, 4

    def randn(*shape):  # drawn on the CPU, moved before the views are taken
        return torch.randn(*shape, dtype=dtype).to(device)

    q = randn(B, H, S, D).transpose(1, 2)  # heads-major storage
    k = randn(B, S + 3, H_kv, 2 * D + 1)[:, 3:, :, 1 : D + 1]  # a slice, one element off alignment
    v = randn(D, B, S, H_kv).permute(1, 2, 3, 0)  # last dim strided
    assert not any(t.is_contiguous() for t in (q, k, v))
    check_causal(q, k, v, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    assert ops.block_causal_attention(*causal_inputs(0, 5, 2, 2, 8, device=device), 2).shape == (0, 5, 2, 8)
    assert ops.block_causal_attention(*causal_inputs(2, 0, 2, 2, 8, device=device), 2).shape == (2, 0, 2, 8)


OPCHECK_SAMPLES = {  # causal_inputs arguments, block_size
    "f32-gqa": ((2, 19, 12, 4, 64, torch.float32), 4),
    "f32-D64": ((1, 37, 4, 2, 64, torch.float32), 8),
    "bf16": ((1, 7, 2, 2, 24, torch.bfloat16), 3),
    "bf16-D64": ((1, 37, 4, 2, 64, torch.bfloat16), 8),
    "f16-full": ((1, 40, 3, 1, 20, torch.float16), 100),
}


@pytest.mark.parametrize("sample", list(OPCHECK_SAMPLES))
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, sample):
    dims, block_size = OPCHECK_SAMPLES[sample]
    args = (*causal_inputs(*dims, device=device), block_size)
    torch.library.opcheck(op, args)
    torch.library.opcheck(op, (*args, 0.3))


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


# (B, S, H, H_kv, D, block_size); the mma-* shapes have blocks that straddle the CUDA
# kernel's 64-key tiles (masked diagonal tiles).
LOCALITY_SHAPES = {
    "gqa-bs5": (2, 37, 6, 2, 20, 5),
    "bs16": (1, 70, 2, 2, 64, 16),
    "transposed-causal": (2, 40, 24, 4, 16, 1),
    "mma-tiles-bs24": (1, 200, 4, 2, 64, 24),
    "mma-D128-bs7": (1, 150, 2, 1, 128, 7),
}


@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(LOCALITY_SHAPES.values()), ids=list(LOCALITY_SHAPES))
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_values_stay_local(device, shape, dtype, where, special):
    B, S, H, H_kv, D, block_size = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, where)).encode()))  # same in every process
    q, k, v = causal_inputs(B, S, H, H_kv, D, dtype=dtype, device=device)
    dirty = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    heads = H if where == "q" else H_kv
    b0, p0, h0, d0 = (int(torch.randint(0, m, (1,), generator=gen)) for m in (B, S, heads, D))
    dirty[where][b0, p0, h0, d0] = special
    mask = seen_by((B, S, H, H_kv), block_size, where, b0, p0, h0).to(device)

    # The reference's locality does not depend on the device: checked once, on the CPU.
    checked = [("kernel", op, lambda t: t)]
    if device.type == "cpu":
        checked.append(("reference", reference_block_causal_attention, lambda t: t.double()))
    for name, fn, cast in checked:
        clean = fn(cast(q), cast(k), cast(v), block_size)
        out = fn(cast(dirty["q"]), cast(dirty["k"]), cast(dirty["v"]), block_size)
        assert torch.equal(out[~mask], clean[~mask]), f"{name}: the value leaked to outputs that do not see it"
        # NaN anywhere and +-inf in a value make every output that sees them non-finite
        # (an inf key may instead only drop out of the softmax).
        if math.isnan(special) or where == "v":
            assert not torch.isfinite(out[mask]).all(dim=-1).any(), f"{name}: an output that sees it stayed finite"


# ---------------------------------------------------------------------------------------
# The CPU kernel and the wrapper


def test_block_one_is_causal_and_block_s_is_full():
    q, k, v = causal_inputs(1, 40, 4, 2, 32)
    kr, vr = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    sdpa = lambda causal: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), is_causal=causal
    ).transpose(1, 2)
    torch.testing.assert_close(ops.block_causal_attention(q, k, v, 1), sdpa(True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.block_causal_attention(q, k, v, 40), sdpa(False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.block_causal_attention(q, k, v, 1000), sdpa(False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.block_causal_attention(q, k, v, 2**62), sdpa(False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keys_scoring_minus_inf_drop_out(dtype):
    # Keys 0..34 score -inf for every query (q > 0, a -inf element): whole key tiles of -inf
    # must not poison the running max (-inf - -inf = NaN) of the rows that see later,
    # finite keys; rows that see only those keys are NaN in the reference and the kernel.
    q, k, v = causal_inputs(2, 70, 4, 2, 24, dtype=dtype)
    q = q.abs() + 0.1
    k[:, :35, :, 5] = -math.inf
    out = ops.block_causal_attention(q, k, v, 5)
    ref64 = reference_block_causal_attention(q.double(), k.double(), v.double(), 5)
    assert torch.isnan(ref64[:, :35]).all() and torch.isnan(out[:, :35]).all()
    ref_low = None if dtype == torch.float32 else reference_block_causal_attention(q, k, v, 5)[:, 35:]
    assert_flash_error_rule(out[:, 35:], ref64[:, 35:], ref_low)


# Invalid inputs raise ValueError naming the argument.

Q, K, V = causal_inputs(2, 8, 4, 2, 16)


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


def test_scale_beyond_float32_and_non_int_block_size_are_refused():
    q, k, v = causal_inputs(1, 6, 2, 2, 8)
    for scale in (1e300, -1e39):
        with pytest.raises(ValueError, match="scale must fit in float32"):
            op(q, k, v, 2, scale)
    for block_size in (2.5, 2.0, True, "2", None):
        with pytest.raises(ValueError, match="block_size must be an int"):
            ops.block_causal_attention(q, k, v, block_size)
    # An exact integer of another type is not truncated, so it is accepted.
    assert torch.equal(ops.block_causal_attention(q, k, v, torch.tensor(3)), ops.block_causal_attention(q, k, v, 3))


# Fuzz. (The only function-scoped fixture is the autouse seed, harmless across examples.)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_against_reference(data):
    B = data.draw(st.integers(1, 2), label="B")
    S = data.draw(st.integers(1, 70), label="S")
    H_kv = data.draw(st.integers(1, 3), label="H_kv")
    group = data.draw(st.integers(1, 3), label="group")
    D = data.draw(st.integers(1, 40), label="D")
    block_size = data.draw(st.integers(1, 80), label="block_size")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    scale = data.draw(st.one_of(st.none(), st.floats(0.05, 2.0)), label="scale")
    q, k, v = causal_inputs(B, S, H_kv * group, H_kv, D, dtype=dtype)
    check_causal(q, k, v, block_size, scale=scale)
