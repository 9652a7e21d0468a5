"""The CUDA kernels of the did_engine ops against the float64 references.

Twins of the CPU kernel tests, run on a CUDA device: random inputs (never zeros), odd
sizes, GQA, per-row cache lengths including 0 and S_max - n, non-contiguous and unaligned
inputs (which take the kernels' fallback paths), float32 / bfloat16 / float16 under the
FlashAttention error rule, snapshot_remask bit-identical to the reference and to the CPU
kernel, opcheck on CUDA samples, the memory-safe behaviour on out-of-range values, the
DID_ENGINE_CHECK_VALUES=1 errors, and a CUDA-graph capture of decode + commit + remask.

Skipped (with the reason) where there is no CUDA device or did_engine was built without
its CUDA kernels.

Checking the tests without a GPU: ``DID_ENGINE_CUDA_TESTS_DEVICE=cpu pytest
tests/test_cuda_ops.py`` runs this module against the CPU kernels. That checks the tests
themselves (valid arguments, references, tolerances, bit-equality claims that hold on any
correct kernel) before a GPU session spends its minutes on them; tests of CUDA-only
behaviour (clamping instead of errors, streams, graphs, big allocations) skip there.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

DEVICE = torch.device(os.environ.get("DID_ENGINE_CUDA_TESTS_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"

if ON_CUDA and not torch.cuda.is_available():
    pytest.skip(
        "no CUDA device (or a CPU build of torch): the CUDA kernels cannot run here; "
        "tests/test_cuda_compile.py still checks that they compile",
        allow_module_level=True,
    )

try:
    from did_engine import ops
    from did_engine.ops import reference
except ImportError as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"did_engine is not built: {exc}", allow_module_level=True)

from did_engine.ops import OPS  # noqa: E402
_missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"did_engine::{op}", "CUDA")]
if ON_CUDA and _missing:
    pytest.skip(
        f"did_engine was built without CUDA kernels for {_missing}; rebuild on this machine with "
        "`DID_ENGINE_CUDA=1 pip install --no-build-isolation -e .`",
        allow_module_level=True,
    )

# The CPU tests' case generators (tests/ is on sys.path under pytest). Those modules need
# hypothesis (the [test] extra); where it is missing only the tests using them skip.
CPU_TESTS_MISSING = ""
try:
    import test_block_causal_attention as cpu_causal_tests
    import test_block_decode_attention as cpu_decode_tests
except ImportError as exc:  # pragma: no cover - depends on the environment
    cpu_causal_tests = cpu_decode_tests = None
    CPU_TESTS_MISSING = f"the CPU test modules do not import here ({exc})"
needs_cpu_tests = pytest.mark.skipif(cpu_decode_tests is None, reason=CPU_TESTS_MISSING)

pytestmark = pytest.mark.cuda
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA-only behaviour (DID_ENGINE_CUDA_TESTS_DEVICE=cpu)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VALUE_CHECKS_ON = os.environ.get("DID_ENGINE_CHECK_VALUES") == "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    if ON_CUDA:
        torch.cuda.manual_seed_all(0)


def assert_flash_error_rule(out: torch.Tensor, ref64: torch.Tensor, ref_same_dtype: torch.Tensor | None) -> None:
    """float32: max abs error <= 1e-5 against float64. bf16/fp16: at most twice the error of
    the reference computed in the same dtype, plus 1e-5 of slack (FlashAttention's rule)."""
    assert out.shape == ref64.shape
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), "non-finite output"
    err = (out.double() - ref64).abs().max().item()
    if out.dtype == torch.float32:
        assert err <= 1e-5, f"float32 max abs error {err:.3g} > 1e-5"
    else:
        ref_err = (ref_same_dtype.double() - ref64).abs().max().item()
        assert err <= 2 * ref_err + 1e-5, f"{out.dtype} max abs error {err:.3g} > 2 x {ref_err:.3g} + 1e-5"


# ---------------------------------------------------------------------------------------
# block_decode_attention


def decode_inputs(B, n, H, H_kv, D, S_max, lens, dtype):
    q = torch.randn(B, n, H, D, device=DEVICE, dtype=dtype)
    k_cache = torch.randn(B, S_max, H_kv, D, device=DEVICE, dtype=dtype)
    v_cache = torch.randn(B, S_max, H_kv, D, device=DEVICE, dtype=dtype)
    k_block = torch.randn(B, n, H_kv, D, device=DEVICE, dtype=dtype)
    v_block = torch.randn(B, n, H_kv, D, device=DEVICE, dtype=dtype)
    cache_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, k_block, v_block, cache_lens


def check_decode(args, scale=None):
    out = ops.block_decode_attention(*args, scale=scale)
    q = args[0]
    assert out.device == q.device and out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    ref64 = reference.reference_block_decode_attention(*(a.double() for a in args[:5]), args[5], scale=scale)
    ref_low = None if q.dtype == torch.float32 else reference.reference_block_decode_attention(*args, scale=scale)
    assert_flash_error_rule(out, ref64, ref_low)


# (B, n, H, H_kv, D, S_max, cache_lens). Rows per kv head R = n * H / H_kv decide the row
# grouping: R = 4, 16 (one M-tile), 48 (three M-tiles), 64, 128 (two row groups); D 64 and
# 128 take the tensor-core path in bf16/fp16, the others the FMA path; few (b, kv head)
# pairs and long caches give many splits, some empty (short rows, length 0).
DECODE_SHAPES = [
    (1, 1, 1, 1, 16, 1, [1]),
    (3, 3, 12, 4, 64, 97, [0, 94, 97]),
    (2, 16, 12, 4, 80, 1025, [1025, 1009]),
    (2, 4, 4, 4, 24, 3, [3, 0]),
    (1, 16, 8, 8, 64, 1025, [1025]),
    (2, 1, 12, 4, 20, 97, [50, 97]),
    (1, 4, 2, 1, 64, 1025, [1025]),
    (2, 3, 4, 1, 24, 1025, [0, 1025]),
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
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "B{}n{}H{}Hkv{}D{}S{}".format(*s[:6]))
def test_decode_matches_reference(shape, dtype):
    check_decode(decode_inputs(*shape, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_explicit_scale(dtype):
    check_decode(decode_inputs(2, 4, 6, 3, 64, 40, [7, 40], dtype=dtype), scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [24, 64])
def test_decode_non_contiguous_unaligned(dtype, D):
    B, n, H, H_kv, S_max = 3, 4, 12, 4, 97
    q = torch.randn(B, H, n, D, device=DEVICE, dtype=dtype).transpose(1, 2)
    # Offset by one element: not 16-byte aligned, so the tensor-core path must step aside.
    k_cache = torch.randn(B, S_max + 5, H_kv, 2 * D, device=DEVICE, dtype=dtype)[:, 2 : S_max + 2, :, 1 : D + 1]
    v_cache = torch.randn(D, B, S_max, H_kv, device=DEVICE, dtype=dtype).permute(1, 2, 3, 0)  # last dim strided
    k_block = torch.randn(1, n, H_kv, D, device=DEVICE, dtype=dtype).expand(B, n, H_kv, D)
    v_block = torch.randn(B, H_kv, n, D, device=DEVICE, dtype=dtype).transpose(1, 2)
    # A strided view of lengths 97 (S_max), 93 and 50; the skipped slots would be out of range.
    cache_lens = torch.tensor([97, -1, 93, -1, 50, -1], dtype=torch.int32, device=DEVICE)[::2]
    check_decode((q, k_cache, v_cache, k_block, v_block, cache_lens))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_non_contiguous_aligned(dtype):
    # Views of fused buffers whose rows stay 16-byte aligned: the fast paths take them.
    B, n, H, H_kv, D, S_max = 2, 16, 12, 4, 64, 300
    kv = torch.randn(B, S_max, 2, H_kv, D, device=DEVICE, dtype=dtype)
    qkv = torch.randn(B, n, H + 2 * H_kv, D, device=DEVICE, dtype=dtype)
    q, k_block, v_block = qkv[:, :, :H], qkv[:, :, H : H + H_kv], qkv[:, :, H + H_kv :]
    cache_lens = torch.tensor([284, 17], dtype=torch.int32, device=DEVICE)
    check_decode((q, kv[:, :, 0], kv[:, :, 1], k_block, v_block, cache_lens))


def test_decode_empty_batch_and_heads():
    assert ops.block_decode_attention(*decode_inputs(0, 4, 4, 2, 8, 5, [], torch.float32)).shape == (0, 4, 4, 8)
    assert ops.block_decode_attention(*decode_inputs(2, 4, 0, 2, 8, 5, [1, 2], torch.float32)).shape == (2, 4, 0, 8)


def test_decode_does_not_change_inputs():
    args = decode_inputs(2, 4, 4, 2, 64, 50, [10, 50], torch.bfloat16)
    before = [a.clone() for a in args]
    ops.block_decode_attention(*args)
    for a, b in zip(args, before):
        assert torch.equal(a, b)


@pytest.mark.skipif(VALUE_CHECKS_ON, reason="DID_ENGINE_CHECK_VALUES=1 turns out-of-range values into errors")
@cuda_only
def test_decode_clamps_out_of_range_lengths():
    # Without the value checks, lengths are clamped to [0, S_max]: memory-safe, no error.
    args = decode_inputs(3, 4, 4, 2, 64, 40, [0, 0, 0], torch.float32)
    bad = torch.tensor([-5, 41, 1 << 30], dtype=torch.int32, device=DEVICE)
    clamped = torch.tensor([0, 40, 40], dtype=torch.int32, device=DEVICE)
    out = ops.block_decode_attention(*args[:5], bad)
    expected = ops.block_decode_attention(*args[:5], clamped)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "args",
    [
        decode_inputs(2, 4, 12, 4, 64, 33, [33, 0], torch.float32),
        decode_inputs(1, 3, 2, 2, 64, 5, [2], torch.bfloat16),
        decode_inputs(3, 1, 4, 1, 20, 300, [0, 299, 300], torch.float16),
    ],
    ids=["f32-gqa", "bf16-mma", "f16-split"],
)
def test_decode_opcheck(args):
    op = torch.ops.did_engine.block_decode_attention.default
    torch.library.opcheck(op, args)
    torch.library.opcheck(op, (*args, 0.25))


# ---------------------------------------------------------------------------------------
# kv_commit


def commit_inputs(B, n, H_kv, D, S_max, lens, dtype):
    k_cache = torch.randn(B, S_max, H_kv, D, device=DEVICE, dtype=dtype)
    v_cache = torch.randn(B, S_max, H_kv, D, device=DEVICE, dtype=dtype)
    k_block = torch.randn(B, n, H_kv, D, device=DEVICE, dtype=dtype)
    v_block = torch.randn(B, n, H_kv, D, device=DEVICE, dtype=dtype)
    cache_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, k_block, v_block, cache_lens


def check_commit(args):
    expected = reference.reference_kv_commit(*args)
    ops.kv_commit(*args)
    for got, want in zip((args[0], args[1], args[4]), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1, 1, [0]), (3, 4, 12, 64, 97, [0, 50, 93]), (2, 16, 4, 80, 1025, [1009, 3]), (2, 3, 2, 3, 7, [4, 1])],
    ids=str,
)
def test_commit_matches_reference(shape, dtype):
    check_commit(commit_inputs(*shape, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_commit_non_contiguous(dtype):
    B, n, H_kv, D, S_max = 3, 4, 2, 24, 40
    # Caches: unaligned views of wider buffers (head_dim contiguous, as required).
    k_cache = torch.randn(B, S_max, H_kv, D + 3, device=DEVICE, dtype=dtype)[..., 1 : D + 1]
    v_cache = torch.randn(B, H_kv, S_max, D, device=DEVICE, dtype=dtype).transpose(1, 2)
    k_block = torch.randn(B, n, H_kv, D, device=DEVICE, dtype=dtype).transpose(0, 1).contiguous().transpose(0, 1)
    v_block = torch.randn(D, B, n, H_kv, device=DEVICE, dtype=dtype).permute(1, 2, 3, 0)  # last dim strided
    cache_lens = torch.tensor([0, 0, 36, 0, 17], dtype=torch.int32, device=DEVICE)[::2]
    check_commit((k_cache, v_cache, k_block, v_block, cache_lens))


def test_commit_empty_block_and_batch():
    check_commit(commit_inputs(2, 0, 2, 8, 5, [1, 5], torch.float32))
    check_commit(commit_inputs(0, 3, 2, 8, 5, [], torch.float32))


@pytest.mark.skipif(VALUE_CHECKS_ON, reason="DID_ENGINE_CHECK_VALUES=1 turns out-of-range values into errors")
@cuda_only
def test_commit_skips_rows_that_would_overflow():
    args = commit_inputs(4, 4, 2, 16, 10, [6, 7, -1, 2], torch.float32)
    k_cache, v_cache, _, _, lens = args
    before_k, before_v = k_cache.clone(), v_cache.clone()
    ops.kv_commit(*args)
    assert lens.tolist() == [10, 7, -1, 6]
    for b in (1, 2):  # untouched rows
        assert torch.equal(k_cache[b], before_k[b]) and torch.equal(v_cache[b], before_v[b])
    assert torch.equal(k_cache[0, 6:10], args[2][0]) and torch.equal(v_cache[3, 2:6], args[3][3])


def test_commit_opcheck():
    torch.library.opcheck(torch.ops.did_engine.kv_commit.default, commit_inputs(2, 4, 3, 64, 20, [0, 16], torch.bfloat16))


# ---------------------------------------------------------------------------------------
# block_causal_attention


def causal_inputs(B, S, H, H_kv, D, dtype):
    q = torch.randn(B, S, H, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, S, H_kv, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, S, H_kv, D, device=DEVICE, dtype=dtype)
    return q, k, v


def check_causal(q, k, v, block_size, scale=None):
    out = ops.block_causal_attention(q, k, v, block_size, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    ref64 = reference.reference_block_causal_attention(q.double(), k.double(), v.double(), block_size, scale=scale)
    ref_low = None if q.dtype == torch.float32 else reference.reference_block_causal_attention(q, k, v, block_size, scale)
    assert_flash_error_rule(out, ref64, ref_low)


# (B, S, H, H_kv, D, block_size): S not a multiple of the block or of the CTA tiles, causal
# (1), full (>= S), GQA, tensor-core head dims 64/128 and FMA ones.
CAUSAL_SHAPES = [
    (1, 1, 1, 1, 16, 1),
    (2, 97, 12, 4, 64, 4),
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
@pytest.mark.parametrize("shape", CAUSAL_SHAPES, ids=lambda s: "B{}S{}H{}Hkv{}D{}bs{}".format(*s))
def test_causal_matches_reference(shape, dtype):
    B, S, H, H_kv, D, bs = shape
    check_causal(*causal_inputs(B, S, H, H_kv, D, dtype), bs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_explicit_scale_and_non_contiguous(dtype):
    B, S, H, H_kv, D = 2, 77, 4, 2, 64
    qkv = torch.randn(B, S, H + 2 * H_kv, D, device=DEVICE, dtype=dtype)  # aligned views
    check_causal(qkv[:, :, :H], qkv[:, :, H : H + H_kv], qkv[:, :, H + H_kv :], 8, scale=0.2)
    q = torch.randn(B, H, S, D, device=DEVICE, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, S, H_kv, D + 1, device=DEVICE, dtype=dtype)[..., 1:]  # unaligned
    v = torch.randn(D, B, S, H_kv, device=DEVICE, dtype=dtype).permute(1, 2, 3, 0)  # last dim strided
    check_causal(q, k, v, 8)


def test_causal_empty():
    q, k, v = causal_inputs(2, 0, 2, 2, 8, torch.float32)
    assert ops.block_causal_attention(q, k, v, 4).shape == (2, 0, 2, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_causal_opcheck(dtype):
    q, k, v = causal_inputs(1, 37, 4, 2, 64, dtype)
    op = torch.ops.did_engine.block_causal_attention.default
    torch.library.opcheck(op, (q, k, v, 8))
    torch.library.opcheck(op, (q, k, v, 8, 0.3))


# ---------------------------------------------------------------------------------------
# snapshot_remask


def remask_inputs(B, S, ties=False, specials=False, eligible_fraction=0.8, count_dtype=torch.int64, max_count=None):
    tokens = torch.randint(0, 50257, (B, S), device=DEVICE)
    if ties:  # a few distinct values: long runs of equal confidence
        confidence = torch.randint(0, 6, (B, S), device=DEVICE).float() / 5
    else:
        confidence = torch.rand(B, S, device=DEVICE) + 1e-3
    if specials and S >= 8:
        specials_row = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, float("nan"), 1e-40, -1e-40])
        for b in range(B):
            positions = torch.randperm(S)[:8]
            confidence[b, positions] = specials_row.to(DEVICE)
    eligible = torch.rand(B, S, device=DEVICE) < eligible_fraction
    counts_eligible = eligible.sum(1)
    upper = counts_eligible if max_count is None else counts_eligible.clamp(max=max_count)
    num_remask = (torch.rand(B, device=DEVICE) * (upper + 1).float()).long().clamp(max=upper).to(count_dtype)
    return tokens, confidence, num_remask, eligible


def check_remask(tokens, confidence, num_remask, eligible, mask_id=50257, reset_value=float("inf"), max_k=None):
    if max_k is None:
        max_k = int(num_remask.max()) if num_remask.numel() else 0
    want_tokens, want_conf, want_idx = reference.reference_snapshot_remask(
        tokens.cpu(), confidence.cpu(), num_remask.cpu(), eligible.cpu(), mask_id, reset_value, max_k
    )
    cpu_args = (tokens.cpu().clone(), confidence.cpu().clone(), num_remask.cpu(), eligible.cpu())
    idx = ops.snapshot_remask(tokens, confidence, num_remask, eligible, mask_id, reset_value, max_k=max_k)
    assert idx.device == tokens.device and idx.dtype == torch.int64 and idx.shape == (tokens.shape[0], max_k)
    exact = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(idx.cpu(), want_idx, **exact)
    torch.testing.assert_close(tokens.cpu(), want_tokens, **exact)
    torch.testing.assert_close(confidence.cpu(), want_conf, **exact)
    if torch._C._dispatch_has_kernel_for_dispatch_key("did_engine::snapshot_remask", "CPU"):
        cpu_idx = ops.snapshot_remask(*cpu_args, mask_id, reset_value, max_k=max_k)
        torch.testing.assert_close(idx.cpu(), cpu_idx, **exact)
        torch.testing.assert_close(tokens.cpu(), cpu_args[0], **exact)
        torch.testing.assert_close(confidence.cpu(), cpu_args[1], **exact)


@pytest.mark.parametrize("count_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize(
    "B, S, ties, specials",
    [
        (1, 1, False, False),
        (3, 3, False, False),
        (4, 97, True, False),
        (5, 97, False, True),
        (2, 1025, False, True),
        (3, 1025, True, True),
        (2, 8192, True, True),
        (1, 10000, False, True),
    ],
)
def test_remask_matches_reference(B, S, ties, specials, count_dtype):
    check_remask(*remask_inputs(B, S, ties=ties, specials=specials, count_dtype=count_dtype))


def test_remask_sampler_shape():
    # The DiD refine step: B = 64 rows of 1024, 256 remasked each, max_k fixed in advance.
    tokens, confidence, _, eligible = remask_inputs(64, 1024, eligible_fraction=0.9)
    num_remask = torch.full((64,), 256, device=DEVICE)
    check_remask(tokens, confidence, num_remask, eligible, max_k=256)


def test_remask_edge_counts():
    tokens, confidence, _, eligible = remask_inputs(4, 50, ties=True)
    eligible[1] = False
    eligible[2] = True
    counts = torch.tensor([0, 0, 50, int(eligible[3].sum())], device=DEVICE)
    check_remask(tokens, confidence, counts, eligible, max_k=50, reset_value=-1.5, mask_id=7)  # max_k = S


def test_remask_non_contiguous():
    B, S = 4, 300
    tokens = torch.randint(0, 100, (S, B), device=DEVICE).t()
    confidence = torch.rand(S, B, device=DEVICE).t()
    eligible = (torch.rand(B, 2 * S, device=DEVICE) < 0.7)[:, ::2]
    counts = torch.tensor([0, 5, 100, 17], dtype=torch.int32, device=DEVICE)
    check_remask(tokens, confidence, counts, eligible, max_k=120)


def test_remask_zero_width():
    tokens, confidence, _, eligible = remask_inputs(3, 10)
    check_remask(tokens, confidence, torch.zeros(3, dtype=torch.long, device=DEVICE), eligible, max_k=0)
    empty = remask_inputs(0, 10)
    check_remask(*empty, max_k=0)


@pytest.mark.skipif(VALUE_CHECKS_ON, reason="DID_ENGINE_CHECK_VALUES=1 turns out-of-range values into errors")
@cuda_only
def test_remask_clamps_out_of_range_counts():
    # Without the value checks, counts are clamped to [0, min(eligible count, max_k)].
    tokens, confidence, _, eligible = remask_inputs(3, 64)
    max_k = 5
    bad = torch.tensor([-3, 1000, 4], device=DEVICE)
    clamped = torch.minimum(bad.clamp(min=0), eligible.sum(1).clamp(max=max_k))
    tokens2, confidence2 = tokens.clone(), confidence.clone()
    got = ops.snapshot_remask(tokens, confidence, bad, eligible, 1, 0.0, max_k=max_k)
    want = ops.snapshot_remask(tokens2, confidence2, clamped, eligible, 1, 0.0, max_k=max_k)
    assert torch.equal(got, want)
    assert torch.equal(tokens, tokens2) and torch.equal(confidence, confidence2)


def test_remask_opcheck():
    tokens, confidence, num_remask, eligible = remask_inputs(3, 97, ties=True)
    max_k = int(num_remask.max())
    torch.library.opcheck(
        torch.ops.did_engine.snapshot_remask.default, (tokens, confidence, num_remask, eligible, 5, 2.0, max_k)
    )


# ---------------------------------------------------------------------------------------
# DID_ENGINE_CHECK_VALUES=1 (read once per process, so in a subprocess)


@cuda_only
def test_value_checks_raise_in_a_subprocess():
    script = textwrap.dedent(
        """
        import torch
        from did_engine import ops
        dev = "cuda"

        def expect(fn, words):
            try:
                fn()
            except ValueError as exc:
                for word in words:
                    assert word in str(exc), (word, str(exc))
                return
            raise AssertionError(f"no ValueError (expected {words})")

        kc = torch.randn(2, 10, 2, 16, device=dev)
        kb = torch.randn(2, 4, 2, 16, device=dev)
        q = torch.randn(2, 4, 4, 16, device=dev)
        lens = torch.tensor([3, 11], dtype=torch.int32, device=dev)
        expect(lambda: ops.block_decode_attention(q, kc, kc.clone(), kb, kb.clone(), lens), ["cache_lens[1] = 11"])
        lens = torch.tensor([3, 7], dtype=torch.int32, device=dev)
        vc = kc.clone()
        before = kc.clone()
        expect(lambda: ops.kv_commit(kc, vc, kb, kb.clone(), lens), ["cache_lens[1] = 7"])
        assert torch.equal(kc, before) and lens.tolist() == [3, 7]  # refused: nothing written

        tokens = torch.zeros(2, 8, dtype=torch.long, device=dev)
        conf = torch.rand(2, 8, device=dev)
        elig = torch.ones(2, 8, dtype=torch.bool, device=dev)
        elig[1, 3:] = False
        expect(lambda: ops.snapshot_remask(tokens, conf, torch.tensor([1, 4], device=dev), elig, 9, max_k=4),
               ["num_remask[1] = 4", "3 eligible"])
        expect(lambda: ops.snapshot_remask(tokens, conf, torch.tensor([-1, 0], device=dev), elig, 9, max_k=4),
               ["num_remask[0] = -1", "negative"])
        expect(lambda: ops.snapshot_remask(tokens, conf, torch.tensor([5, 0], device=dev), elig, 9, max_k=4),
               ["num_remask[0] = 5", "max_k"])
        assert torch.equal(tokens, torch.zeros_like(tokens))
        print("OK")
        """
    )
    env = dict(os.environ, DID_ENGINE_CHECK_VALUES="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------
# A draft step (decode + commit + remask) captured in a CUDA graph and replayed.


@cuda_only
def test_cuda_graph_capture_of_a_draft_step():
    B, n, H, H_kv, D, S_max, S = 4, 4, 12, 4, 64, 256, 128
    dtype = torch.bfloat16
    q, k_cache, v_cache, k_block, v_block, cache_lens = decode_inputs(B, n, H, H_kv, D, S_max, [0, 16, 100, 252], dtype)
    tokens, confidence, _, eligible = remask_inputs(B, S)
    num_remask = torch.tensor([3, 0, 17, 40], device=DEVICE)
    max_k = 40
    static = [q, k_cache, v_cache, k_block, v_block, cache_lens, tokens, confidence, num_remask, eligible]
    initial = [t.clone() for t in static]

    def reset(state):
        for t, s in zip(static, state):
            t.copy_(s)

    def step():
        out = ops.block_decode_attention(q, k_cache, v_cache, k_block, v_block, cache_lens)
        ops.kv_commit(k_cache, v_cache, k_block, v_block, cache_lens)
        idx = ops.snapshot_remask(tokens, confidence, num_remask, eligible, 50257, max_k=max_k)
        return out, idx

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as torch.cuda.graphs recommends
        for _ in range(2):
            reset(initial)
            step()
    torch.cuda.current_stream().wait_stream(side)
    reset(initial)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_idx = step()

    # Replay from two different states: the graph reads lengths and data on the device.
    other = [t.clone() for t in initial]
    other[0].copy_(torch.randn_like(other[0]))
    other[5].copy_(torch.tensor([252, 0, 7, 64], dtype=torch.int32))
    other[7].copy_(torch.rand_like(other[7]))
    for state in (initial, other):
        reset(state)
        want_out = reference.reference_block_decode_attention(*(t.double() for t in state[:5]), state[5])
        want_low = reference.reference_block_decode_attention(*state[:6])
        want_k, want_v, want_lens = reference.reference_kv_commit(*state[1:6])
        want_tokens, want_conf, want_idx = reference.reference_snapshot_remask(
            *(t.cpu() for t in state[6:]), 50257, float("inf"), max_k
        )
        graph.replay()
        torch.cuda.synchronize()
        assert_flash_error_rule(static_out, want_out, want_low)
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v) and torch.equal(cache_lens, want_lens)
        assert torch.equal(static_idx.cpu(), want_idx)
        assert torch.equal(tokens.cpu(), want_tokens) and torch.equal(confidence.cpu(), want_conf)


# ---------------------------------------------------------------------------------------
# The tensor-core path against the float32 kernel, its two fragment loaders, NaN/inf
# locality, graphs with splits and big shared memory, offsets beyond 2^31 elements.


def fp16_rounding_tolerance(weights: torch.Tensor, values: torch.Tensor, out32: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |fp16 tensor-core output - float32 kernel output|.

    weights [..., R, L]: float64 softmax weights of R output rows over L keys (masked keys
    0); values [..., L, D]; out32 [..., R, D]. The tensor-core path multiplies V by
    probabilities rounded to fp16 (relative error <= 2^-11 each, independent signs): 6
    standard deviations of that sum, 6 * 2^-11 * sqrt(sum_j w_j^2 v_j^2), plus half an fp16
    ulp of the output (its final rounding) and 1e-6 for float32 summation order. Both paths
    divide by float32 sums of the unrounded probabilities.
    """
    noise = 2.0**-11 * torch.sqrt(weights.square().matmul(values.double().square()))
    exponent = torch.frexp(out32.double().abs().clamp(min=2.0**-14)).exponent  # |x| in [2^(e-1), 2^e)
    half_ulp = torch.pow(2.0, exponent.double() - 12)
    return 6 * noise + half_ulp + 1e-6


def single_key_effect(weights: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Median over rows and keys of how much dropping one key moves its row's output,
    max over D of w_j |v_j - out| (shapes as fp16_rounding_tolerance; pass a few rows): the
    tolerance must stay well below it for the test to see one lost key."""
    moved = weights.unsqueeze(-1) * (values.double().unsqueeze(-3) - out.double().unsqueeze(-2)).abs()
    return moved.amax(-1).median()


def decode_weights_and_values(q, k_cache, v_cache, k_block, v_block, cache_lens, b):
    """Row b's float64 softmax weights [H, n, L] and values [H, L, D] (GQA expanded)."""
    H, H_kv, D = q.shape[2], k_cache.shape[2], q.shape[3]
    length = int(cache_lens[b])
    keys = torch.cat([k_cache[b, :length], k_block[b]]).double().repeat_interleave(H // H_kv, dim=1)
    values = torch.cat([v_cache[b, :length], v_block[b]]).double().repeat_interleave(H // H_kv, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q[b].double(), keys) / math.sqrt(D)
    return scores.softmax(-1), values.permute(1, 0, 2)


@pytest.mark.parametrize("shape", [(1, 4, 4, 1, 64, 4096, [4092]), (2, 16, 20, 4, 128, 2000, [1984, 700])],
                         ids=["D64-splits", "D128-row-groups"])
def test_decode_mma_matches_float32_kernel(shape):
    # fp16 in, tensor-core path; the float32 kernel on the same values upcast is exact to
    # ~1e-6. The tolerance is derived from the data, and its typical value checked to stay
    # below half of what one dropped key typically changes: long rows, where a bf16-loose
    # rule would not see a lost key.
    args = decode_inputs(*shape, dtype=torch.float16)
    out16 = ops.block_decode_attention(*args)
    out32 = ops.block_decode_attention(*(a.float() for a in args[:5]), args[5])
    for b in range(shape[0]):
        weights, values = decode_weights_and_values(*args, b)
        want = out32[b].permute(1, 0, 2)  # [H, n, D]
        tol = fp16_rounding_tolerance(weights, values, want)
        effect = single_key_effect(weights[:2, :2], values[:2], want[:2, :2])
        assert tol.median() < 0.5 * effect, (tol.median().item(), effect.item())
        err = (out16[b].permute(1, 0, 2).double() - want.double()).abs()
        assert (err <= tol).all(), f"row {b}: max excess {(err - tol).max().item():.3g}, max err {err.max().item():.3g}"


def test_causal_mma_matches_float32_kernel():
    B, S, H, H_kv, D, bs = 1, 1500, 4, 2, 64, 24
    q, k, v = causal_inputs(B, S, H, H_kv, D, torch.float16)
    out16 = ops.block_causal_attention(q, k, v, bs)
    out32 = ops.block_causal_attention(q.float(), k.float(), v.float(), bs)
    keys = k[0].double().repeat_interleave(H // H_kv, dim=1).permute(1, 0, 2)  # [H, S, D]
    values = v[0].double().repeat_interleave(H // H_kv, dim=1).permute(1, 0, 2)
    scores = q[0].double().permute(1, 0, 2).matmul(keys.transpose(1, 2)) / math.sqrt(D)  # [H, S, S]
    allowed = reference.block_causal_mask(S, bs, device=q.device)
    weights = scores.masked_fill(~allowed, -math.inf).softmax(-1)
    want = out32[0].permute(1, 0, 2)  # [H, S, D]
    tol = fp16_rounding_tolerance(weights, values, want)
    # The last rows see all 1500 keys: where one lost key is hardest to see.
    effect = single_key_effect(weights[:2, -4:], values[:2], want[:2, -4:])
    assert tol[:, -200:].median() < 0.5 * effect, (tol[:, -200:].median().item(), effect.item())
    err = (out16[0].permute(1, 0, 2).double() - want.double()).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}, max err {err.max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_ldmatrix_and_scalar_fragment_loads_agree(dtype, monkeypatch):
    # DID_ENGINE_MMA_FRAGMENTS (read at each launch) picks the tensor-core path's K/V loads;
    # both build the same fragments, so the outputs must be bit-identical, and right.
    decode_args = decode_inputs(2, 16, 20, 4, 128, 300, [290, 5], dtype)  # R = 80: partial row group
    decode_args[2][0, 3, 1, 7] = math.nan  # inside row 0's cache: reaches its group only
    causal_args = causal_inputs(2, 150, 4, 2, 64, dtype)
    outputs = {}
    for loads in ("scalar", "ldmatrix"):
        monkeypatch.setenv("DID_ENGINE_MMA_FRAGMENTS", loads)
        outputs[loads] = (ops.block_decode_attention(*decode_args), ops.block_causal_attention(*causal_args, 7))
    for scalar, ldmatrix in zip(outputs["scalar"], outputs["ldmatrix"]):
        assert torch.equal(scalar.isnan(), ldmatrix.isnan())
        assert torch.equal(scalar.nan_to_num(), ldmatrix.nan_to_num())
    check_causal(*causal_args, 7)  # default loads; the scalar ones are bit-equal to them


# The CPU locality shapes plus tensor-core ones: many splits (one kv head, S_max 4096) and
# R = 80 rows per kv head (a partial second row group), D 128.
DECODE_LOCALITY_SHAPES = [(1, 4, 4, 1, 64, 4096, [3000]), (2, 16, 20, 4, 128, 300, [250, 33])]
DECODE_LOCALITY_IDS = ["mma-many-splits", "mma-row-groups"]
if cpu_decode_tests is not None:
    DECODE_LOCALITY_SHAPES = cpu_decode_tests.LOCALITY_SHAPES + DECODE_LOCALITY_SHAPES
    DECODE_LOCALITY_IDS = ["cpu-split", "cpu-transposed"] + DECODE_LOCALITY_IDS


@pytest.mark.parametrize("special", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DECODE_LOCALITY_SHAPES, ids=DECODE_LOCALITY_IDS)
def test_decode_cache_tail_is_never_read(shape, dtype, special):
    # Positions at or past cache_lens[b] may hold anything: bit-equal to random finite tails.
    args = decode_inputs(*shape, dtype=dtype)
    clean = ops.block_decode_attention(*args)
    k_cache, v_cache = args[1].clone(), args[2].clone()
    for b, length in enumerate(shape[-1]):
        k_cache[b, length:] = special
        v_cache[b, length:] = -special
    assert torch.equal(ops.block_decode_attention(args[0], k_cache, v_cache, *args[3:]), clean)


@pytest.mark.parametrize("where", ["q", "k_cache", "v_cache", "k_block", "v_block"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DECODE_LOCALITY_SHAPES, ids=DECODE_LOCALITY_IDS)
@needs_cpu_tests
def test_decode_non_finite_values_stay_local(shape, dtype, where):
    # As the CPU test: a NaN reaches exactly the outputs that see it, the rest is bit-equal.
    D = shape[4]
    names = ["q", "k_cache", "v_cache", "k_block", "v_block", "cache_lens"]
    args = dict(zip(names, decode_inputs(*shape, dtype=dtype)))
    clean = ops.block_decode_attention(*args.values())
    (b0, pos, head), mask = cpu_decode_tests.nan_case(shape, where)
    mask = mask.to(DEVICE)
    args[where] = args[where].clone()
    args[where][b0, pos, head, D // 2] = math.nan
    out = ops.block_decode_attention(*args.values())
    assert torch.equal(out[~mask], clean[~mask])
    assert not torch.isfinite(out[mask]).all(dim=-1).any()


@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(2, 37, 6, 2, 20, 5), (1, 70, 2, 2, 64, 16), (2, 40, 24, 4, 16, 1), (1, 200, 4, 2, 64, 24), (1, 150, 2, 1, 128, 7)],
    ids=["gqa-bs5", "bs16", "transposed-causal", "mma-tiles-bs24", "mma-D128-bs7"],
)
@needs_cpu_tests
def test_causal_non_finite_values_stay_local(shape, dtype, where, special):
    # The CPU test's cases (seen_by from tests/test_block_causal_attention.py) plus
    # tensor-core shapes whose blocks straddle 64-key tiles (masked diagonal tiles).
    B, S, H, H_kv, D, block_size = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, where)).encode()))
    q, k, v = causal_inputs(B, S, H, H_kv, D, dtype)
    dirty = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    heads = H if where == "q" else H_kv
    b0, p0, h0, d0 = (int(torch.randint(0, m, (1,), generator=gen)) for m in (B, S, heads, D))
    dirty[where][b0, p0, h0, d0] = special
    mask = cpu_causal_tests.seen_by((B, S, H, H_kv), block_size, where, b0, p0, h0).to(DEVICE)
    clean = ops.block_causal_attention(q, k, v, block_size)
    out = ops.block_causal_attention(dirty["q"], dirty["k"], dirty["v"], block_size)
    assert torch.equal(out[~mask], clean[~mask]), "the value leaked to outputs that do not see it"
    if math.isnan(special) or where == "v":
        assert not torch.isfinite(out[mask]).all(dim=-1).any(), "an output that sees it stayed finite"


@pytest.mark.parametrize(
    "shape",
    [(1, 4, 4, 1, 64, 8192, [8188]), (2, 16, 8, 2, 80, 6000, [5990, 3001]), (1, 1, 8, 1, 128, 4096, [4095])],
    ids=["D64", "D80-gqa", "D128-n1"],
)
def test_decode_float32_long_rows_with_splits(shape):
    # float32 through the FMA kernel with many splits, under the build's --use_fast_math
    # (setup.py; exp2f/log2f/division are approximate there): still 1e-5 of float64, with
    # scores spread wide (x2 inputs) so that the split log-sum-exp merge matters.
    args = list(decode_inputs(*shape, dtype=torch.float32))
    args[0] = args[0] * 2
    args[1] = args[1] * 2
    check_decode(tuple(args))


def test_size_one_dims_keep_the_fast_path():
    # Size-1 dims may carry any stride; the kernels must not let it push an aligned input off
    # the tensor-core path: the outputs are bit-equal to those of contiguous copies (the
    # FMA fallback would round differently).
    D, H, H_kv, S_max, n = 64, 4, 2, 200, 1
    def odd(t):  # the same values, with stride 3 (odd elements) on every size-1 dim
        strides = [3 if size == 1 else stride for size, stride in zip(t.shape, t.stride())]
        out = torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device)
        out.copy_(t)
        return out
    args = decode_inputs(1, n, H, H_kv, D, S_max, [150], torch.bfloat16)
    odd_args = [odd(a) for a in args[:5]] + [args[5]]
    assert odd_args[0].stride(0) == 3 and odd_args[0].stride(1) == 3
    assert torch.equal(ops.block_decode_attention(*odd_args), ops.block_decode_attention(*args))
    q, k, v = causal_inputs(1, 77, H, H_kv, D, torch.bfloat16)
    assert torch.equal(ops.block_causal_attention(odd(q), odd(k), odd(v), 8), ops.block_causal_attention(q, k, v, 8))
    commit = commit_inputs(1, 4, H_kv, D, 40, [9], torch.bfloat16)
    check_commit(tuple(odd(a) for a in commit[:4]) + (commit[4],))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_cuda_graph_capture_of_decode_with_splits(dtype):
    # One kv head and S_max 4096: the plan gives many KV splits (one row group), so the graph
    # holds the main kernel, the split workspace and the combine kernel.
    B, n, H, H_kv, D, S_max = 2, 4, 4, 1, 64, 4096
    args = decode_inputs(B, n, H, H_kv, D, S_max, [4096, 0], dtype)
    static = [a.clone() for a in args]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.block_decode_attention(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ops.block_decode_attention(*static)
    for lens in ([4096, 0], [1000, 4093], [63, 2049]):
        fresh = decode_inputs(B, n, H, H_kv, D, S_max, lens, dtype)
        for t, f in zip(static, fresh):
            t.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        want64 = reference.reference_block_decode_attention(*(a.double() for a in fresh[:5]), fresh[5])
        want_low = None if dtype == torch.float32 else reference.reference_block_decode_attention(*fresh)
        assert_flash_error_rule(static_out, want64, want_low)
        assert torch.equal(static_out, ops.block_decode_attention(*fresh))  # graph == eager, bit for bit


@cuda_only
def test_big_shared_memory_kernels_captured_before_any_eager_launch():
    # head_dim 128 on the tensor cores needs 68 KB of shared memory (above the default 48 KB):
    # the opt-in (cudaFuncSetAttribute) then happens inside the capture, in a fresh process
    # where nothing launched these kernels before.
    script = textwrap.dedent(
        """
        import torch
        from did_engine import ops
        from did_engine.ops import reference
        torch.manual_seed(0)
        dev, dt = "cuda", torch.bfloat16
        q = torch.randn(2, 16, 8, 128, device=dev, dtype=dt)
        kc, vc = (torch.randn(2, 700, 2, 128, device=dev, dtype=dt) for _ in range(2))
        kb, vb = (torch.randn(2, 16, 2, 128, device=dev, dtype=dt) for _ in range(2))
        lens = torch.tensor([700, 31], dtype=torch.int32, device=dev)
        cq, ck, cv = (torch.randn(1, 300, 4, 128, device=dev, dtype=dt) for _ in range(3))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decode_out = ops.block_decode_attention(q, kc, vc, kb, vb, lens)
            causal_out = ops.block_causal_attention(cq, ck, cv, 16)
        graph.replay()
        torch.cuda.synchronize()
        checks = [
            (decode_out, reference.reference_block_decode_attention(q.double(), kc.double(), vc.double(),
                                                                     kb.double(), vb.double(), lens),
             reference.reference_block_decode_attention(q, kc, vc, kb, vb, lens)),
            (causal_out, reference.reference_block_causal_attention(cq.double(), ck.double(), cv.double(), 16),
             reference.reference_block_causal_attention(cq, ck, cv, 16)),
        ]
        for out, ref64, ref_low in checks:
            err = (out.double() - ref64).abs().max().item()
            ref_err = (ref_low.double() - ref64).abs().max().item()
            assert torch.isfinite(out).all() and err <= 2 * ref_err + 1e-5, (err, ref_err)
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


@cuda_only
@pytest.mark.slow
def test_offsets_beyond_2_31_elements():
    # Batch row 1 of every input starts 2^31 + 64 elements into its buffer: int32 offsets
    # would wrap. bf16, head_dim 64, aligned: the tensor-core paths (kv_commit takes 64-bit
    # math: its caches' extent is beyond 2^31 bytes).
    far = 2**31 + 64
    H, H_kv, D, S, n = 4, 2, 64, 1024, 16
    need = 3 * 2 * (far + S * H * D)  # bytes: q, k, v buffers
    free, _ = torch.cuda.mem_get_info()
    if free < need + 2 * 2**30:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    dtype = torch.bfloat16

    def far_rows(heads, rows):  # [2, rows, heads, D] with batch stride `far`; rows 0 and 1 random
        buffer = torch.empty(far + rows * heads * D, dtype=dtype, device=DEVICE)
        view = buffer.as_strided((2, rows, heads, D), (far, heads * D, D, 1))
        view[0].normal_()
        view[1].normal_()
        return view

    q_all, k_cache, v_cache = far_rows(H, S), far_rows(H_kv, S), far_rows(H_kv, S)
    small = lambda t: t.contiguous()  # noqa: E731 - both rows, copied out of the big buffers
    # kv_commit into row 1's far region; nothing else in the row changes.
    k_block, v_block = (torch.randn(2, n, H_kv, D, device=DEVICE, dtype=dtype) for _ in range(2))
    lens = torch.tensor([100, 1000], dtype=torch.int32, device=DEVICE)
    want_k, want_v, want_lens = reference.reference_kv_commit(small(k_cache), small(v_cache), k_block, v_block, lens)
    ops.kv_commit(k_cache, v_cache, k_block, v_block, lens)
    assert torch.equal(small(k_cache), want_k) and torch.equal(small(v_cache), want_v)
    assert torch.equal(lens, want_lens)
    # Decode over the committed caches, q from the far buffer too.
    q = q_all[:, :n]
    args = (q, k_cache, v_cache, torch.randn_like(k_block), torch.randn_like(v_block), lens)
    out = ops.block_decode_attention(*args)
    small_args = [small(a) for a in args]
    ref64 = reference.reference_block_decode_attention(*(a.double() for a in small_args[:5]), lens)
    assert_flash_error_rule(out, ref64, reference.reference_block_decode_attention(*small_args))
    # Block-causal prefill over the far buffers (kv heads of k/v, all heads of q).
    check_causal(q_all, k_cache, v_cache, 64)
