"""block_decode_attention (CPU kernel) against the pure-PyTorch reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from did_engine import ops
from did_engine.ops.reference import reference_block_decode_attention

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
op = torch.ops.did_engine.block_decode_attention.default


def make_inputs(B, n, H, H_kv, D, S_max, lens, dtype=torch.float32):
    """Random q [B,n,H,D], caches [B,S_max,H_kv,D], block k/v [B,n,H_kv,D], int32 lens [B]."""
    q = torch.randn(B, n, H, D, dtype=dtype)
    k_cache = torch.randn(B, S_max, H_kv, D, dtype=dtype)
    v_cache = torch.randn(B, S_max, H_kv, D, dtype=dtype)
    k_block = torch.randn(B, n, H_kv, D, dtype=dtype)
    v_block = torch.randn(B, n, H_kv, D, dtype=dtype)
    cache_lens = torch.tensor(lens, dtype=torch.int32)
    return q, k_cache, v_cache, k_block, v_block, cache_lens


def check_against_reference(check, args, scale=None):
    out = ops.block_decode_attention(*args, scale=scale)
    q = args[0]
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    ref64 = reference_block_decode_attention(*(a.double() for a in args[:5]), args[5], scale=scale)
    ref_low = None if q.dtype == torch.float32 else reference_block_decode_attention(*args, scale=scale)
    check(out, ref64, ref_low)


# (B, n, H, H_kv, D, S_max, cache_lens): odd sizes, GQA and plain heads, lengths 0,
# S_max - n and S_max, and few (b, kv head) pairs so that the key sequence is split.
SHAPES = [
    (1, 1, 1, 1, 16, 1, [1]),
    (3, 3, 12, 4, 64, 97, [0, 94, 97]),
    (2, 16, 12, 4, 80, 1025, [1025, 1009]),
    (2, 4, 4, 4, 24, 3, [3, 0]),
    (1, 16, 8, 8, 64, 1025, [1025]),
    (2, 1, 12, 4, 20, 97, [50, 97]),
    (1, 4, 2, 1, 64, 1025, [1025]),  # one kv head: split-KV
    (2, 3, 4, 1, 24, 1025, [0, 1025]),  # split-KV with empty splits in row 0
    (1, 5, 6, 2, 20, 97, [40]),  # 15 rows per kv head (transposed tiles), padded head dim
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}n{}H{}Hkv{}D{}S{}".format(*s[:6]))
def test_matches_reference(shape, dtype, check_lowp_error):
    check_against_reference(check_lowp_error, make_inputs(*shape, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_explicit_scale(dtype, check_lowp_error):
    args = make_inputs(2, 4, 6, 3, 32, 40, [7, 40], dtype=dtype)
    check_against_reference(check_lowp_error, args, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype, check_lowp_error):
    B, n, H, H_kv, D, S_max = 3, 4, 12, 4, 24, 97
    # q: heads-major storage viewed as [B, n, H, D].
    q = torch.randn(B, H, n, D, dtype=dtype).transpose(1, 2)
    # k_cache: a slice of a longer, wider cache.
    k_cache = torch.randn(B, S_max + 5, H_kv, 2 * D, dtype=dtype)[:, 2 : S_max + 2, :, 1 : D + 1]
    # v_cache: last dim not contiguous (the kernel copies it).
    v_cache = torch.randn(D, B, S_max, H_kv, dtype=dtype).permute(1, 2, 3, 0)
    # k_block: one block broadcast over the batch (stride 0); v_block: transposed storage.
    k_block = torch.randn(1, n, H_kv, D, dtype=dtype).expand(B, n, H_kv, D)
    v_block = torch.randn(B, H_kv, n, D, dtype=dtype).transpose(1, 2)
    cache_lens = torch.tensor([97, 0, 0, 93, 0, 50], dtype=torch.int32)[::2]
    assert not any(t.is_contiguous() for t in (q, k_cache, v_cache, k_block, v_block, cache_lens))
    check_against_reference(check_lowp_error, (q, k_cache, v_cache, k_block, v_block, cache_lens))


def test_single_thread_matches_multi_thread():
    # The split-KV plan depends on each row's key count only: bit-equal at any thread count.
    args = make_inputs(1, 4, 4, 2, 64, 1025, [1000])
    multi = ops.block_decode_attention(*args)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.block_decode_attention(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)


def test_empty_batch_and_heads():
    assert ops.block_decode_attention(*make_inputs(0, 4, 4, 2, 8, 5, [])).shape == (0, 4, 4, 8)
    assert ops.block_decode_attention(*make_inputs(2, 4, 0, 2, 8, 5, [1, 2])).shape == (2, 4, 0, 8)


@pytest.mark.parametrize(
    "args",
    [
        make_inputs(2, 4, 12, 4, 64, 33, [33, 0]),
        make_inputs(1, 3, 2, 2, 24, 5, [2], dtype=torch.bfloat16),
        make_inputs(3, 1, 4, 1, 20, 300, [0, 299, 300], dtype=torch.float16),
    ],
    ids=["f32-gqa", "bf16", "f16-split"],
)
def test_opcheck(args):
    torch.library.opcheck(op, args)
    torch.library.opcheck(op, (*args, 0.25))


# ---------------------------------------------------------------------------------------
# Invalid inputs raise ValueError naming the argument.


def _replace(args, index, value):
    args = list(args)
    args[index] = value
    return args


BASE = make_inputs(2, 4, 12, 4, 16, 10, [3, 10])


@pytest.mark.parametrize(
    "bad_args, match",
    [
        (_replace(BASE, 0, BASE[0][0]), "q must be a 4-D"),
        (_replace(BASE, 1, BASE[1][..., 0]), "k_cache must be a 4-D"),
        (_replace(BASE, 5, BASE[5][None]), "cache_lens must be a 1-D"),
        (_replace(BASE, 0, BASE[0].double()), "q must be float32, bfloat16 or float16"),
        (_replace(BASE, 1, BASE[1].half()), "k_cache has dtype"),
        (_replace(BASE, 4, BASE[4].bfloat16()), "v_block has dtype"),
        (_replace(BASE, 5, BASE[5].long()), "cache_lens must be int32"),
        (_replace(BASE, 5, torch.tensor([3, -1], dtype=torch.int32)), r"cache_lens\[1\] = -1"),
        (_replace(BASE, 5, torch.tensor([11, 0], dtype=torch.int32)), r"cache_lens\[0\] = 11"),
        (_replace(BASE, 5, torch.tensor([3], dtype=torch.int32)), "cache_lens must have B=2"),
        (_replace(BASE, 0, torch.randn(2, 4, 10, 16)), "not a multiple"),
        (_replace(BASE, 0, torch.randn(2, 0, 12, 16)), "at least one query"),
        (_replace(BASE, 3, torch.randn(2, 3, 4, 16)), "k_block must be"),
        (_replace(BASE, 4, torch.randn(2, 4, 4, 8)), "v_block must have"),
        (_replace(BASE, 2, torch.randn(2, 11, 4, 16)), "v_cache must have"),
        (_replace(BASE, 1, torch.randn(3, 10, 4, 16)), "k_cache must be"),
        ([*BASE, math.nan], "scale must be finite"),
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
    B = data.draw(st.integers(1, 3), label="B")
    n = data.draw(st.integers(1, 5), label="n")
    H_kv = data.draw(st.integers(1, 3), label="H_kv")
    group = data.draw(st.integers(1, 3), label="group")
    D = data.draw(st.integers(1, 40), label="D")
    S_max = data.draw(st.integers(1, 80), label="S_max")
    lens = data.draw(st.lists(st.integers(0, S_max), min_size=B, max_size=B), label="cache_lens")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    scale = data.draw(st.one_of(st.none(), st.floats(0.05, 2.0)), label="scale")
    args = make_inputs(B, n, H_kv * group, H_kv, D, S_max, lens, dtype=dtype)
    check_against_reference(check_lowp_error, args, scale=scale)


def test_scale_beyond_float32_is_refused():
    with pytest.raises(ValueError, match="scale must fit in float32"):
        op(*BASE, 1e300)


# ---------------------------------------------------------------------------------------
# NaN and inf stay where they are.

# (B, n, H, H_kv, D, S_max, cache_lens): split and unsplit rows, both tile layouts.
LOCALITY_SHAPES = [(3, 4, 6, 2, 20, 700, [300, 0, 650]), (2, 16, 8, 2, 64, 97, [40, 96])]


@pytest.mark.parametrize("special", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOCALITY_SHAPES, ids=["split", "transposed"])
def test_cache_tail_is_never_read(shape, dtype, special):
    # Positions at or past cache_lens[b] may hold anything: the output equals the run with
    # random finite tails bit for bit.
    args = make_inputs(*shape, dtype=dtype)
    clean = op(*args)
    k_cache, v_cache = args[1].clone(), args[2].clone()
    for b, length in enumerate(shape[-1]):
        k_cache[b, length:] = special
        v_cache[b, length:] = -special
    assert torch.equal(op(args[0], k_cache, v_cache, *args[3:]), clean)


def nan_case(shape, where):
    """Where the locality tests put their NaN in input `where`, (b, position, head), and the
    [B, n, H] outputs that see it. Row 0 must have a non-empty cache."""
    B, n, H, H_kv, D, S_max, lens = shape
    b0 = 0
    pos = lens[b0] // 2 if "cache" in where else n // 2
    head = H // 2 if where == "q" else H_kv - 1
    mask = torch.zeros(B, n, H, dtype=torch.bool)
    if where == "q":
        mask[b0, pos, head] = True
    else:  # every query of row b0, on the heads of that kv head's group
        group = H // H_kv
        mask[b0, :, head * group : (head + 1) * group] = True
    return (b0, pos, head), mask


@pytest.mark.parametrize("where", ["q", "k_cache", "v_cache", "k_block", "v_block"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOCALITY_SHAPES, ids=["split", "transposed"])
def test_non_finite_values_stay_local(shape, dtype, where):
    D = shape[4]
    args = dict(zip(["q", "k_cache", "v_cache", "k_block", "v_block", "cache_lens"], make_inputs(*shape, dtype=dtype)))
    clean = op(*args.values())
    (b0, pos, head), mask = nan_case(shape, where)
    args[where] = args[where].clone()
    args[where][b0, pos, head, D // 2] = math.nan
    out = op(*args.values())
    assert torch.equal(out[~mask], clean[~mask])
    assert not torch.isfinite(out[mask]).all(dim=-1).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_scoring_minus_inf_drops_out(dtype, check_lowp_error):
    # q > 0 and a -inf in a key element: that key scores -inf for every query and simply
    # gets weight 0. The first key (a tile, or a split, of its own) must not poison the
    # running max with -inf - -inf = NaN.
    args = list(make_inputs(2, 4, 4, 2, 16, 300, [1, 300], dtype=dtype))
    args[0] = args[0].abs() + 0.1
    args[1] = args[1].clone()
    args[1][:, 0, :, 3] = -math.inf
    check_against_reference(check_lowp_error, args)
