"""pytest-benchmark entries for the ops and their baselines (not part of the test suite).

    python -m pytest bench/test_bench_ops.py --benchmark-only --benchmark-group-by=param:case

Each case benchmarks ours and the baseline as separate entries in the same group, so
pytest-benchmark's table shows them side by side. bench_ops.py prints the full grid.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from did_engine import ops
from did_engine.ops.reference import block_causal_mask

H, D = 12, 64


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("impl", ["did_engine", "sdpa"])
@pytest.mark.parametrize("case", ["B8-S1024-n4-float32", "B64-S4096-n4-bfloat16", "B8-S1024-n16-bfloat16"])
def test_decode_attention(benchmark, case, impl):
    B, S, n, dtype = case.split("-")
    B, S, n, dtype = int(B[1:]), int(S[1:]), int(n[1:]), getattr(torch, dtype)
    q = _randn(B, n, H, D, dtype=dtype)
    k_cache, v_cache = _randn(B, S, H, D, dtype=dtype), _randn(B, S, H, D, dtype=dtype)
    k_block, v_block = _randn(B, n, H, D, dtype=dtype), _randn(B, n, H, D, dtype=dtype)
    lens = torch.full((B,), S - n, dtype=torch.int32)
    if impl == "did_engine":
        benchmark(ops.block_decode_attention, q, k_cache, v_cache, k_block, v_block, lens)
    else:
        k_all = torch.cat([k_cache[:, : S - n], k_block], 1).transpose(1, 2).contiguous()
        v_all = torch.cat([v_cache[:, : S - n], v_block], 1).transpose(1, 2).contiguous()
        benchmark(F.scaled_dot_product_attention, q.transpose(1, 2).contiguous(), k_all, v_all)


@pytest.mark.parametrize("impl", ["did_engine", "sdpa_dense_mask"])
@pytest.mark.parametrize("case", ["B1-S1024-block4-float32", "B8-S1024-block4-bfloat16"])
def test_block_causal_attention(benchmark, case, impl):
    B, S, blk, dtype = case.split("-")
    B, S, blk, dtype = int(B[1:]), int(S[1:]), int(blk[5:]), getattr(torch, dtype)
    q, k, v = (_randn(B, S, H, D, dtype=dtype) for _ in range(3))
    if impl == "did_engine":
        benchmark(ops.block_causal_attention, q, k, v, blk)
    else:
        mask = block_causal_mask(S, blk)
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        benchmark(F.scaled_dot_product_attention, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("impl", ["did_engine", "topk_scatter"])
@pytest.mark.parametrize("case", ["B64-S1024-k256", "B1-S4096-k1024"])
def test_snapshot_remask(benchmark, case, impl):
    B, S, k = (int(part[1:]) for part in case.split("-"))
    tokens, conf = torch.randint(0, 50257, (B, S)), torch.rand(B, S)
    eligible = torch.ones(B, S, dtype=torch.bool)
    eligible[:, : S // 8] = False

    # Remasking is idempotent enough for timing: later calls select among reset (inf) values
    # only after the finite ones run out, so every call does the full selection work.
    if impl == "did_engine":
        benchmark(ops.snapshot_remask, tokens, conf, k, eligible, 50257)
    else:
        def composition():
            idx = torch.topk(conf.masked_fill(~eligible, float("inf")), k, dim=1, largest=False).indices
            idx = idx.sort(dim=1).values
            tokens.scatter_(1, idx, 50257)
            conf.scatter_(1, idx, float("inf"))

        benchmark(composition)
