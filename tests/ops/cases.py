"""Inputs and checks shared by the op tests: one input generator per op, the devices they
run on, and the FlashAttention error rule.

Devices. Tests that take a ``device`` argument run once per entry of ``DEVICES``: ``cpu``
and ``cuda`` (ids ``[cpu-...]`` and ``[cuda-...]``, the latter also marked ``cuda``, so
``-m cuda`` selects them and ``-m "not cuda"`` leaves them out). The ``cuda`` cases skip,
with the reason, where there is no CUDA device or did_engine was built without its CUDA
kernels (tests/ops/test_cuda_compile.py still checks that the CUDA sources compile).

Dry run without a GPU: ``DID_ENGINE_CUDA_TESTS_DEVICE=cpu pytest tests/ops -m cuda`` runs
the ``cuda`` cases on the CPU kernels. That checks the tests themselves (valid arguments,
references, tolerances, bit-equality claims that hold on any correct kernel) before a GPU
session spends its minutes on them; tests of CUDA-only behaviour (``cuda_only``: clamping
instead of errors, streams, graphs, big allocations) skip there.

Inputs are drawn on the CPU (from the global generator, seeded per test by
tests/conftest.py, or from an explicit seed) and then moved to the device, so a case sees
the same values on every device. They are random (never zeros), in odd sizes.
"""

from __future__ import annotations

import os

import pytest
import torch

from did_engine import ops
from did_engine.ops import OPS
from did_engine.ops.reference import (reference_block_causal_attention, reference_block_decode_attention,
                                      reference_kv_commit)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# ---------------------------------------------------------------------------------------
# Devices

CUDA_TESTS_DEVICE = torch.device(os.environ.get("DID_ENGINE_CUDA_TESTS_DEVICE", "cuda"))
ON_CUDA = CUDA_TESTS_DEVICE.type == "cuda"
# DID_ENGINE_CHECK_VALUES=1 makes the CUDA kernels raise on out-of-range values (as the
# CPU kernels always do) instead of clamping them.
VALUE_CHECKS_ON = os.environ.get("DID_ENGINE_CHECK_VALUES") == "1"


def _cuda_skip_reason() -> str | None:
    """Why the ``cuda`` cases cannot run here, or None."""
    if not ON_CUDA:
        return None  # the dry run on the CPU kernels
    if not torch.cuda.is_available():
        return "no CUDA device (DID_ENGINE_CUDA_TESTS_DEVICE=cpu runs these cases on the CPU kernels)"
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"did_engine::{op}", "CUDA")]
    if missing:
        return (f"did_engine was built without CUDA kernels for {missing}; rebuild on this machine with "
                "`DID_ENGINE_CUDA=1 pip install --no-build-isolation -e .`")
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()
_cuda_marks = [pytest.mark.cuda] + ([pytest.mark.skip(reason=CUDA_SKIP_REASON)] if CUDA_SKIP_REASON else [])
# The values of a `device` parameter: pytest.mark.parametrize("device", DEVICES).
DEVICES = [pytest.param(torch.device("cpu"), id="cpu"), pytest.param(CUDA_TESTS_DEVICE, id="cuda", marks=_cuda_marks)]
# Whole modules of CUDA tests: pytestmark = CUDA_MODULE_MARKS.
CUDA_MODULE_MARKS = _cuda_marks
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA-only behaviour (DID_ENGINE_CUDA_TESTS_DEVICE=cpu)")
clamps_values = pytest.mark.skipif(VALUE_CHECKS_ON, reason="DID_ENGINE_CHECK_VALUES=1 turns out-of-range values into errors")


def shape_id(template: str):
    """An ids function for shape tuples: shape_id("B{}n{}")((2, 4, ...)) -> "B2n4"."""
    return lambda shape: template.format(*shape)


# ---------------------------------------------------------------------------------------
# The FlashAttention error rule


def assert_flash_error_rule(out: torch.Tensor, ref64: torch.Tensor, ref_same_dtype: torch.Tensor | None) -> None:
    """float32 kernels: max abs error <= 1e-5 against the float64 reference ``ref64``.
    bfloat16/float16 kernels: at most twice the error of the reference computed in the same
    dtype (``ref_same_dtype``), plus 1e-5 of absolute slack for tiny outputs."""
    assert out.shape == ref64.shape
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), "non-finite output"
    err = (out.double() - ref64).abs().max().item()
    if out.dtype == torch.float32:
        assert err <= 1e-5, f"float32 max abs error {err:.3g} > 1e-5"
    else:
        assert ref_same_dtype is not None and ref_same_dtype.dtype == out.dtype
        ref_err = (ref_same_dtype.double() - ref64).abs().max().item()
        assert err <= 2 * ref_err + 1e-5, (
            f"{out.dtype} max abs error {err:.3g} > 2 x {ref_err:.3g} (reference in {out.dtype}) + 1e-5"
        )


# ---------------------------------------------------------------------------------------
# One input generator per op


def decode_inputs(B, n, H, H_kv, D, S_max, lens, dtype=torch.float32, device="cpu"):
    """block_decode_attention: q [B, n, H, D], caches [B, S_max, H_kv, D], block k/v
    [B, n, H_kv, D], int32 cache_lens [B] = lens."""
    q = torch.randn(B, n, H, D, dtype=dtype)
    k_cache = torch.randn(B, S_max, H_kv, D, dtype=dtype)
    v_cache = torch.randn(B, S_max, H_kv, D, dtype=dtype)
    k_block = torch.randn(B, n, H_kv, D, dtype=dtype)
    v_block = torch.randn(B, n, H_kv, D, dtype=dtype)
    cache_lens = torch.tensor(lens, dtype=torch.int32)
    return tuple(t.to(device) for t in (q, k_cache, v_cache, k_block, v_block, cache_lens))


def causal_inputs(B, S, H, H_kv, D, dtype=torch.float32, device="cpu"):
    """block_causal_attention: q [B, S, H, D], k/v [B, S, H_kv, D]."""
    q = torch.randn(B, S, H, D, dtype=dtype)
    k = torch.randn(B, S, H_kv, D, dtype=dtype)
    v = torch.randn(B, S, H_kv, D, dtype=dtype)
    return q.to(device), k.to(device), v.to(device)


def rand(shape, dtype, gen):
    """Standard-normal values from `gen`, cast to dtype (CPU)."""
    return torch.randn(shape, generator=gen).to(dtype)


def commit_inputs(B, S_max, H_kv, D, n, dtype=torch.float32, device="cpu", seed=0, lens=None):
    """kv_commit: caches [B, S_max, H_kv, D], block k/v [B, n, H_kv, D], int32 cache_lens
    [B]. Without `lens`, random lengths that fit, with row 0 at 0 and the last row at
    S_max - n (the last slot that fits). Caches start random, so a copy to the wrong place
    or a missing copy shows."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = rand((B, S_max, H_kv, D), dtype, gen)
    v_cache = rand((B, S_max, H_kv, D), dtype, gen)
    k_block = rand((B, n, H_kv, D), dtype, gen)
    v_block = rand((B, n, H_kv, D), dtype, gen)
    if lens is None:
        lens = torch.randint(0, S_max - n + 1, (B,), generator=gen)
        if B:
            lens[0] = 0
            lens[-1] = S_max - n
    cache_lens = torch.as_tensor(lens, dtype=torch.int32).clone()
    return tuple(t.to(device) for t in (k_cache, v_cache, k_block, v_block, cache_lens))


# snapshot_remask: tokens are drawn below VOCAB and written as MASK_ID, so every write shows.
MASK_ID = 50_000
VOCAB = 1000
CONFIDENCE_PATTERNS = ["rand", "ties", "special", "narrow"]


def make_confidence(B, S, pattern, gen):
    """float32 [B, S] confidences (CPU). pattern: rand | ties | special | narrow."""
    if pattern == "rand":
        return torch.rand(B, S, generator=gen) + 1e-3
    if pattern == "ties":  # a handful of values: many exact ties
        levels = torch.tensor([0.125, 0.25, 0.5, 0.75])
        return levels[torch.randint(0, len(levels), (B, S), generator=gen)]
    if pattern == "special":  # NaN, +-inf, +-0.0, subnormals, negatives and ordinary values mixed
        levels = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-40, -1e-40, -1.5, 0.3, 0.3, 2.0])
        conf = levels[torch.randint(0, len(levels), (B, S), generator=gen)]
        ordinary = torch.rand(B, S, generator=gen) < 0.3
        return torch.where(ordinary, torch.randn(B, S, generator=gen), conf)
    if pattern == "narrow":  # softmax-like: everything in a thin band below 1
        return 1.0 - 1e-3 * torch.rand(B, S, generator=gen)
    raise ValueError(pattern)


def make_eligible(B, S, gen, holes=True):
    """bool [B, S] (CPU): a prompt prefix of random length per row is never eligible;
    optionally some random holes after it (positions already final)."""
    prompt = torch.randint(0, S // 2 + 1, (B,), generator=gen)
    eligible = torch.arange(S)[None, :] >= prompt[:, None]
    if holes:
        eligible &= torch.rand(B, S, generator=gen) > 0.2
    return eligible


def random_counts(eligible, gen, dtype=torch.int64):
    """Per-row counts in [0, eligible count], with row 0 at 0 and the last row at its full
    eligible count whenever there are two rows or more."""
    avail = eligible.sum(1).cpu()
    counts = (torch.rand(eligible.shape[0], generator=gen) * (avail + 1)).long().clamp(max=avail)
    if eligible.shape[0] >= 2:
        counts[0] = 0
        counts[-1] = avail[-1]
    return counts.to(dtype).to(eligible.device)


def remask_inputs(B, S, pattern="rand", seed=0, holes=True, device="cpu"):
    """snapshot_remask: tokens int64 [B, S], confidence float32 [B, S], eligible bool
    [B, S] on `device`, and the generator, for more draws (random_counts)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (B, S), generator=gen)
    confidence = make_confidence(B, S, pattern, gen)
    eligible = make_eligible(B, S, gen, holes)
    return tokens.to(device), confidence.to(device), eligible.to(device), gen


# ---------------------------------------------------------------------------------------
# Checks against the references


def check_decode(args, scale=None):
    """block_decode_attention(*args) against the reference under the FlashAttention rule."""
    out = ops.block_decode_attention(*args, scale=scale)
    q = args[0]
    assert out.device == q.device and out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    ref64 = reference_block_decode_attention(*(a.double() for a in args[:5]), args[5], scale=scale)
    ref_low = None if q.dtype == torch.float32 else reference_block_decode_attention(*args, scale=scale)
    assert_flash_error_rule(out, ref64, ref_low)


def check_causal(q, k, v, block_size, scale=None):
    """block_causal_attention against the reference under the FlashAttention rule."""
    out = ops.block_causal_attention(q, k, v, block_size, scale=scale)
    assert out.device == q.device and out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    ref64 = reference_block_causal_attention(q.double(), k.double(), v.double(), block_size, scale=scale)
    ref_low = None if q.dtype == torch.float32 else reference_block_causal_attention(q, k, v, block_size, scale=scale)
    assert_flash_error_rule(out, ref64, ref_low)


def check_commit(k_cache, v_cache, k_block, v_block, cache_lens, via_op=False):
    """kv_commit in place (the wrapper, or the op itself) against the reference: copies are
    exact in every dtype, and cache_lens is advanced in place."""
    ref_k, ref_v, ref_lens = reference_kv_commit(k_cache, v_cache, k_block, v_block, cache_lens)
    lens_obj = cache_lens
    (torch.ops.did_engine.kv_commit.default if via_op else ops.kv_commit)(k_cache, v_cache, k_block, v_block,
                                                                           cache_lens)
    assert cache_lens is lens_obj
    assert torch.equal(cache_lens, ref_lens), (cache_lens, ref_lens)
    assert torch.equal(k_cache, ref_k)
    assert torch.equal(v_cache, ref_v)


# ---------------------------------------------------------------------------------------
# Refused calls


def bad_args_builder(valid_args):
    """bad(name=fn, ...) -> a builder of valid_args() with args[name] replaced by fn(args)."""

    def bad(**changes):
        def build():
            args = valid_args()
            for name, fn in changes.items():
                args[name] = fn(args)
            return args
        return build

    return bad
