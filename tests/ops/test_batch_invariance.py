"""Batch-row invariance of every op: row b of a batch equals the op applied to row b alone,
bit for bit, and the result does not change with the thread count.

This holds by construction in our kernels (a row's work partition and the order of its
additions depend on that row alone: its key count picks its split-KV plan, its sequence
length its query chunks), not by tolerance. It does not extend to anything a BLAS decides
(the model's Linear layers); see the op docstrings.
"""

from __future__ import annotations

import pytest
import torch

from did_engine import ops

from .cases import DTYPES
THREADS = [1, 2, 3]


def with_threads(count, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def rows(t, b):
    return t[b : b + 1]


# (B, n, H, H_kv, D, S_max, cache_lens): long and short rows together, so that some rows
# are split (256 keys per split) and some are not, and the work items mix both.
DECODE_CASES = [
    (5, 4, 6, 2, 33, 700, [0, 699, 300, 5, 650]),
    (3, 16, 8, 2, 64, 1100, [1100, 17, 600]),  # 64 rows per kv head: transposed tiles
    (9, 1, 4, 4, 16, 300, [300, 0, 1, 255, 256, 257, 100, 200, 299]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "B{}n{}H{}Hkv{}D{}S{}".format(*c[:6]))
def test_decode_attention_rows_and_threads(case, dtype):
    B, n, H, H_kv, D, S_max, lens = case
    q = torch.randn(B, n, H, D).to(dtype)
    k_cache, v_cache = torch.randn(B, S_max, H_kv, D).to(dtype), torch.randn(B, S_max, H_kv, D).to(dtype)
    k_block, v_block = torch.randn(B, n, H_kv, D).to(dtype), torch.randn(B, n, H_kv, D).to(dtype)
    cache_lens = torch.tensor(lens, dtype=torch.int32)
    args = (q, k_cache, v_cache, k_block, v_block, cache_lens)
    full = ops.block_decode_attention(*args)
    for b in range(B):
        alone = ops.block_decode_attention(*(rows(t, b) for t in args))
        assert torch.equal(alone, full[b : b + 1]), f"row {b} alone differs from row {b} in the batch"
    for threads in THREADS:
        assert torch.equal(with_threads(threads, lambda: ops.block_decode_attention(*args)), full), threads


# (B, S, H, H_kv, D, block_size)
CAUSAL_CASES = [(3, 77, 6, 2, 33, 5), (2, 130, 4, 4, 64, 16), (4, 40, 2, 1, 16, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CAUSAL_CASES, ids=lambda c: "B{}S{}H{}Hkv{}D{}bs{}".format(*c))
def test_block_causal_attention_rows_and_threads(case, dtype):
    B, S, H, H_kv, D, block_size = case
    q = torch.randn(B, S, H, D).to(dtype)
    k, v = torch.randn(B, S, H_kv, D).to(dtype), torch.randn(B, S, H_kv, D).to(dtype)
    full = ops.block_causal_attention(q, k, v, block_size)
    for b in range(B):
        alone = ops.block_causal_attention(rows(q, b), rows(k, b), rows(v, b), block_size)
        assert torch.equal(alone, full[b : b + 1]), f"row {b} alone differs from row {b} in the batch"
    for threads in THREADS:
        out = with_threads(threads, lambda: ops.block_causal_attention(q, k, v, block_size))
        assert torch.equal(out, full), threads


def test_snapshot_remask_rows_and_threads():
    B, S = 6, 300
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 100, (B, S), generator=gen)
    confidence = (torch.rand(B, S, generator=gen) * 8).floor() / 8  # many ties
    eligible = torch.rand(B, S, generator=gen) < 0.8
    counts = (eligible.sum(1) * torch.rand(B, generator=gen)).long()
    max_k = int(counts.max())

    def run(t, c, n, e):
        t, c = t.clone(), c.clone()
        idx = ops.snapshot_remask(t, c, n, e, 7, max_k=max_k)
        return t, c, idx

    full = run(tokens, confidence, counts, eligible)
    for b in range(B):
        alone = run(rows(tokens, b), rows(confidence, b), rows(counts, b), rows(eligible, b))
        for got, want in zip(alone, full):
            assert torch.equal(got, want[b : b + 1]), b
    for threads in THREADS:
        out = with_threads(threads, lambda: run(tokens, confidence, counts, eligible))
        assert all(torch.equal(a, b) for a, b in zip(out, full)), threads


def test_kv_commit_rows():
    B, S_max, H_kv, D, n = 4, 30, 2, 8, 5
    k_cache, v_cache = torch.randn(B, S_max, H_kv, D), torch.randn(B, S_max, H_kv, D)
    k_block, v_block = torch.randn(B, n, H_kv, D), torch.randn(B, n, H_kv, D)
    lens = torch.tensor([0, 25, 3, 11], dtype=torch.int32)
    full = [k_cache.clone(), v_cache.clone(), k_block, v_block, lens.clone()]
    ops.kv_commit(*full)
    for b in range(B):
        alone = [rows(k_cache, b).clone(), rows(v_cache, b).clone(), rows(k_block, b), rows(v_block, b),
                 rows(lens, b).clone()]
        ops.kv_commit(*alone)
        for i in (0, 1, 4):
            assert torch.equal(alone[i], full[i][b : b + 1]), (b, i)


@pytest.mark.parametrize("name", ops.OPS)
def test_docstrings_state_the_guarantee(name):
    doc = " ".join(getattr(ops, name).__doc__.split())
    assert "does not depend on the other rows of the batch or on the thread count" in doc
