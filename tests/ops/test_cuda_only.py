"""The CUDA kernels' own paths and behaviours, beyond what the per-op files check on every
device: out-of-range values clamped instead of refused, the DID_ENGINE_CHECK_VALUES=1
errors, CUDA-graph capture (of a whole draft step, of split-KV decode, of kernels that opt
into big shared memory), the fp16 tensor-core (MMA) path against the float32 kernel, its
two fragment loaders (ldmatrix and scalar), size-1 dims on the fast path and offsets
beyond 2^31 elements.

All tests here are marked ``cuda`` and skip, with the reason, where there is no CUDA device
or did_engine was built without its CUDA kernels. ``DID_ENGINE_CUDA_TESTS_DEVICE=cpu``
runs them on the CPU kernels (tests/ops/cases.py), except those marked ``cuda_only``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from did_engine import ops
from did_engine.ops import reference

from .cases import (CUDA_MODULE_MARKS, CUDA_TESTS_DEVICE, assert_flash_error_rule, check_causal, check_commit,
                    clamps_values, commit_inputs, cuda_only, remask_inputs)
from .cases import causal_inputs as _causal_inputs
from .cases import decode_inputs as _decode_inputs

pytestmark = CUDA_MODULE_MARKS
DEVICE = CUDA_TESTS_DEVICE


def decode_inputs(B, n, H, H_kv, D, S_max, lens, dtype=torch.float32):
    """cases.decode_inputs on the CUDA test device."""
    return _decode_inputs(B, n, H, H_kv, D, S_max, lens, dtype, DEVICE)


def causal_inputs(B, S, H, H_kv, D, dtype=torch.float32):
    """cases.causal_inputs on the CUDA test device."""
    return _causal_inputs(B, S, H, H_kv, D, dtype, DEVICE)


# ---------------------------------------------------------------------------------------
# Out-of-range values: clamped (memory-safe, no error) without DID_ENGINE_CHECK_VALUES=1


@clamps_values
@cuda_only
def test_decode_clamps_out_of_range_lengths():
    # Lengths are clamped to [0, S_max].
    args = decode_inputs(3, 4, 4, 2, 64, 40, [0, 0, 0])
    bad = torch.tensor([-5, 41, 1 << 30], dtype=torch.int32, device=DEVICE)
    clamped = torch.tensor([0, 40, 40], dtype=torch.int32, device=DEVICE)
    out = ops.block_decode_attention(*args[:5], bad)
    expected = ops.block_decode_attention(*args[:5], clamped)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@clamps_values
@cuda_only
def test_commit_skips_rows_that_would_overflow():
    args = commit_inputs(4, 10, 2, 16, 4, device=DEVICE, lens=[6, 7, -1, 2])
    k_cache, v_cache, _, _, lens = args
    before_k, before_v = k_cache.clone(), v_cache.clone()
    ops.kv_commit(*args)
    assert lens.tolist() == [10, 7, -1, 6]
    for b in (1, 2):  # untouched rows
        assert torch.equal(k_cache[b], before_k[b]) and torch.equal(v_cache[b], before_v[b])
    assert torch.equal(k_cache[0, 6:10], args[2][0]) and torch.equal(v_cache[3, 2:6], args[3][3])


@clamps_values
@cuda_only
def test_remask_clamps_out_of_range_counts():
    # Counts are clamped to [0, min(eligible count, max_k)].
    tokens, confidence, eligible, _ = remask_inputs(3, 64, device=DEVICE)
    max_k = 5
    bad = torch.tensor([-3, 1000, 4], device=DEVICE)
    clamped = torch.minimum(bad.clamp(min=0), eligible.sum(1).clamp(max=max_k))
    tokens2, confidence2 = tokens.clone(), confidence.clone()
    got = ops.snapshot_remask(tokens, confidence, bad, eligible, 1, 0.0, max_k=max_k)
    want = ops.snapshot_remask(tokens2, confidence2, clamped, eligible, 1, 0.0, max_k=max_k)
    assert torch.equal(got, want)
    assert torch.equal(tokens, tokens2) and torch.equal(confidence, confidence2)


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
    tokens, confidence, eligible, _ = remask_inputs(B, S, device=DEVICE)
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
    commit = commit_inputs(1, 40, H_kv, D, 4, torch.bfloat16, DEVICE, lens=[9])
    check_commit(*(odd(a) for a in commit[:4]), commit[4])


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
