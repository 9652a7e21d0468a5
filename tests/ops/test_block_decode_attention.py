"""block_decode_attention against the float64 reference, on every device (tests/ops/cases.py
says which and how to dry-run the CUDA cases on the CPU).

Tests without a ``device`` argument check the CPU kernel and the wrapper: argument errors,
fuzzing, thread counts. The CUDA kernels' own paths and behaviours are in test_cuda_only.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from did_engine import ops

from .cases import DEVICES, DTYPES, check_decode, decode_inputs, shape_id

op = torch.ops.did_engine.block_decode_attention.default
SHAPE_ID = shape_id("B{}n{}H{}Hkv{}D{}S{}")


# (B, n, H, H_kv, D, S_max, cache_lens): odd sizes, GQA and plain heads, lengths 0,
# S_max - n and S_max. Few (b, kv head) pairs and long caches split the key sequence (some
# splits empty: short rows, length 0). On CUDA, rows per kv head R = n * H / H_kv decide the
# row grouping (R = 4, 16: one M-tile, 48: three, 64, 128: two row groups) and D 64 / 128
# take the tensor-core path in bf16/fp16, the other D the FMA path; on the CPU, 15 rows per
# kv head take the transposed tiles.
SHAPES = [
    (1, 1, 1, 1, 16, 1, [1]),
    (3, 3, 12, 4, 64, 97, [0, 94, 97]),
    (2, 16, 12, 4, 80, 1025, [1025, 1009]),
    (2, 4, 4, 4, 24, 3, [3, 0]),
    (1, 16, 8, 8, 64, 1025, [1025]),
    (2, 1, 12, 4, 20, 97, [50, 97]),
    (1, 4, 2, 1, 64, 1025, [1025]),  # one kv head: split-KV
    (2, 3, 4, 1, 24, 1025, [0, 1025]),  # split-KV with empty splits in row 0
    (1, 5, 6, 2, 20, 97, [40]),  # 15 rows per kv head (CPU transposed tiles), padded head dim
    (2, 4, 12, 12, 64, 1024, [1020, 0]),
    (2, 16, 12, 12, 128, 1024, [1008, 513]),
    (1, 16, 3, 1, 64, 300, [284]),
    (1, 16, 4, 1, 128, 97, [81]),
    (2, 16, 8, 1, 64, 513, [497, 3]),
    (1, 4, 2, 1, 64, 8192, [5]),
    (3, 5, 6, 2, 256, 70, [0, 1, 65]),
    (2, 2, 2, 2, 1, 33, [33, 7]),
    (1, 3, 3, 1, 3, 129, [128]),
    (64, 4, 12, 12, 64, 128, [i * 2 for i in range(64)]),
    # Tensor-core row layouts: R = 24 and 32 (two M-tiles: warps 2 x 2 over M-tiles x keys),
    # R = 80 (row groups of 64 + 16) and R = 100 (64 + 36: three M-tiles, the last with 4 rows).
    (2, 4, 24, 4, 64, 300, [300, 17]),
    (1, 8, 4, 1, 128, 200, [150]),
    (1, 16, 20, 4, 128, 500, [480]),
    (2, 4, 25, 1, 64, 400, [396, 33]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_ID)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device, shape, dtype):
    check_decode(decode_inputs(*shape, dtype=dtype, device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("device", DEVICES)
def test_explicit_scale(device, D, dtype):
    check_decode(decode_inputs(2, 4, 6, 3, D, 40, [7, 40], dtype=dtype, device=device), scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [24, 64])
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_unaligned_inputs(device, D, dtype):
    B, n, H, H_kv, S_max = 3, 4, 12, 4, 97

    def randn(*shape):  # drawn on the CPU, moved before the views are taken
        return torch.randn(*shape, dtype=dtype).to(device)

    # q: heads-major storage viewed as [B, n, H, D].
    q = randn(B, H, n, D).transpose(1, 2)
    # k_cache: a slice of a longer, wider cache, offset by one element: not 16-byte aligned,
    # so the CUDA tensor-core path must step aside.
    k_cache = randn(B, S_max + 5, H_kv, 2 * D)[:, 2 : S_max + 2, :, 1 : D + 1]
    # v_cache: last dim not contiguous (the kernels copy it).
    v_cache = randn(D, B, S_max, H_kv).permute(1, 2, 3, 0)
    # k_block: one block broadcast over the batch (stride 0); v_block: transposed storage.
    k_block = randn(1, n, H_kv, D).expand(B, n, H_kv, D)
    v_block = randn(B, H_kv, n, D).transpose(1, 2)
    # A strided view of lengths S_max, 0 and S_max - n; the skipped slots would be out of range.
    cache_lens = torch.tensor([97, -1, 0, -1, 93, -1], dtype=torch.int32, device=device)[::2]
    args = (q, k_cache, v_cache, k_block, v_block, cache_lens)
    assert not any(t.is_contiguous() for t in args)
    check_decode(args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_aligned_inputs(device, dtype):
    # Views of fused buffers whose rows stay 16-byte aligned: the CUDA fast paths take them.
    B, n, H, H_kv, D, S_max = 2, 16, 12, 4, 64, 300
    kv = torch.randn(B, S_max, 2, H_kv, D, dtype=dtype, device=device)
    qkv = torch.randn(B, n, H + 2 * H_kv, D, dtype=dtype, device=device)
    q, k_block, v_block = qkv[:, :, :H], qkv[:, :, H : H + H_kv], qkv[:, :, H + H_kv :]
    cache_lens = torch.tensor([284, 17], dtype=torch.int32, device=device)
    check_decode((q, kv[:, :, 0], kv[:, :, 1], k_block, v_block, cache_lens))


@pytest.mark.parametrize(
    "shape",
    [(1, 4, 4, 1, 64, 8192, [8188]), (2, 16, 8, 2, 80, 6000, [5990, 3001]), (1, 1, 8, 1, 128, 4096, [4095])],
    ids=["D64", "D80-gqa", "D128-n1"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_float32_long_rows_with_splits(device, shape):
    # float32 with many splits (on CUDA through the FMA kernel under the build's
    # --use_fast_math, where exp2f/log2f/division are approximate): still 1e-5 of float64,
    # with scores spread wide (x2 inputs) so that the split log-sum-exp merge matters.
    args = list(decode_inputs(*shape, device=device))
    args[0] = args[0] * 2
    args[1] = args[1] * 2
    check_decode(tuple(args))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_heads(device):
    assert ops.block_decode_attention(*decode_inputs(0, 4, 4, 2, 8, 5, [], device=device)).shape == (0, 4, 4, 8)
    assert ops.block_decode_attention(*decode_inputs(2, 4, 0, 2, 8, 5, [1, 2], device=device)).shape == (2, 4, 0, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_does_not_change_inputs(device):
    args = decode_inputs(2, 4, 4, 2, 64, 50, [10, 50], torch.bfloat16, device)
    before = [a.clone() for a in args]
    ops.block_decode_attention(*args)
    for a, b in zip(args, before):
        assert torch.equal(a, b)


OPCHECK_SAMPLES = {  # decode_inputs arguments
    "f32-gqa": (2, 4, 12, 4, 64, 33, [33, 0], torch.float32),
    "bf16": (1, 3, 2, 2, 24, 5, [2], torch.bfloat16),
    "bf16-mma": (1, 3, 2, 2, 64, 5, [2], torch.bfloat16),
    "f16-split": (3, 1, 4, 1, 20, 300, [0, 299, 300], torch.float16),
}


@pytest.mark.parametrize("sample", list(OPCHECK_SAMPLES))
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, sample):
    args = decode_inputs(*OPCHECK_SAMPLES[sample], device=device)
    torch.library.opcheck(op, args)
    torch.library.opcheck(op, (*args, 0.25))


# ---------------------------------------------------------------------------------------
# NaN and inf stay where they are.

# (B, n, H, H_kv, D, S_max, cache_lens): split and unsplit rows, both CPU tile layouts; on
# CUDA many splits (one kv head, S_max 4096) and R = 80 rows per kv head (a partial second
# row group), D 128, on the tensor cores.
LOCALITY_SHAPES = {
    "split": (3, 4, 6, 2, 20, 700, [300, 0, 650]),
    "transposed": (2, 16, 8, 2, 64, 97, [40, 96]),
    "mma-many-splits": (1, 4, 4, 1, 64, 4096, [3000]),
    "mma-row-groups": (2, 16, 20, 4, 128, 300, [250, 33]),
}


@pytest.mark.parametrize("special", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(LOCALITY_SHAPES.values()), ids=list(LOCALITY_SHAPES))
@pytest.mark.parametrize("device", DEVICES)
def test_cache_tail_is_never_read(device, shape, dtype, special):
    # Positions at or past cache_lens[b] may hold anything: the output equals the run with
    # random finite tails bit for bit.
    args = decode_inputs(*shape, dtype=dtype, device=device)
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
@pytest.mark.parametrize("shape", list(LOCALITY_SHAPES.values()), ids=list(LOCALITY_SHAPES))
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_values_stay_local(device, shape, dtype, where):
    # A NaN reaches exactly the outputs that see it; every other output is bit-equal.
    D = shape[4]
    args = dict(zip(["q", "k_cache", "v_cache", "k_block", "v_block", "cache_lens"],
                    decode_inputs(*shape, dtype=dtype, device=device)))
    clean = op(*args.values())
    (b0, pos, head), mask = nan_case(shape, where)
    mask = mask.to(device)
    args[where] = args[where].clone()
    args[where][b0, pos, head, D // 2] = math.nan
    out = op(*args.values())
    assert torch.equal(out[~mask], clean[~mask])
    assert not torch.isfinite(out[mask]).all(dim=-1).any()


# ---------------------------------------------------------------------------------------
# The CPU kernel and the wrapper


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_scoring_minus_inf_drops_out(dtype):
    # q > 0 and a -inf in a key element: that key scores -inf for every query and simply
    # gets weight 0. The first key (a tile, or a split, of its own) must not poison the
    # running max with -inf - -inf = NaN.
    args = list(decode_inputs(2, 4, 4, 2, 16, 300, [1, 300], dtype=dtype))
    args[0] = args[0].abs() + 0.1
    args[1] = args[1].clone()
    args[1][:, 0, :, 3] = -math.inf
    check_decode(args)


def test_single_thread_matches_multi_thread():
    # The split-KV plan depends on each row's key count only: bit-equal at any thread count.
    args = decode_inputs(1, 4, 4, 2, 64, 1025, [1000])
    multi = ops.block_decode_attention(*args)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.block_decode_attention(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)


# Invalid inputs raise ValueError naming the argument.


def _replace(args, index, value):
    args = list(args)
    args[index] = value
    return args


BASE = decode_inputs(2, 4, 12, 4, 16, 10, [3, 10])


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


def test_scale_beyond_float32_is_refused():
    with pytest.raises(ValueError, match="scale must fit in float32"):
        op(*BASE, 1e300)


# Fuzz. (The only function-scoped fixture is the autouse seed, harmless across examples.)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_against_reference(data):
    B = data.draw(st.integers(1, 3), label="B")
    n = data.draw(st.integers(1, 5), label="n")
    H_kv = data.draw(st.integers(1, 3), label="H_kv")
    group = data.draw(st.integers(1, 3), label="group")
    D = data.draw(st.integers(1, 40), label="D")
    S_max = data.draw(st.integers(1, 80), label="S_max")
    lens = data.draw(st.lists(st.integers(0, S_max), min_size=B, max_size=B), label="cache_lens")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    scale = data.draw(st.one_of(st.none(), st.floats(0.05, 2.0)), label="scale")
    check_decode(decode_inputs(B, n, H_kv * group, H_kv, D, S_max, lens, dtype=dtype), scale=scale)
