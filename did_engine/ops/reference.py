"""Pure-PyTorch references of the did_engine ops: the ground truth of the tests.

Each function computes the op's contract in the most obvious way (each query against
exactly the keys it sees, full softmax, sorting) in whatever dtype it is given: pass float64 tensors for an exact
reference, or low-precision tensors for "the same computation in the same precision"
(the FlashAttention error rule). They are slow and allocate freely; production code paths
never fall back to them.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "reference_block_decode_attention",
    "reference_kv_commit",
    "reference_block_causal_attention",
    "block_causal_mask",
    "reference_snapshot_remask",
]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """q [n, H, D] attends to every key of k/v [m, H_kv, D] -> [n, H, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [m, H, D]
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,mhd->hnm", q, k) * scale  # [H, n, m]
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hnm,mhd->nhd", probs, v)  # [n, H, D]


def reference_block_decode_attention(q, k_cache, v_cache, k_block, v_block, cache_lens, scale=None):
    """Row b: softmax(q_b [cache_b[:len_b]; block_b]^T * scale) [cache_b[:len_b]; block_b]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        length = int(cache_lens[b])
        k = torch.cat([k_cache[b, :length], k_block[b]], dim=0)  # [len + n, H_kv, D]
        v = torch.cat([v_cache[b, :length], v_block[b]], dim=0)
        out[b] = _attention(q[b], k, v, scale)
    return out


def reference_kv_commit(k_cache, v_cache, k_block, v_block, cache_lens):
    """Functional kv_commit: returns (new k_cache, new v_cache, new cache_lens)."""
    k_cache, v_cache, cache_lens = k_cache.clone(), v_cache.clone(), cache_lens.clone()
    n = k_block.shape[1]
    for b in range(k_cache.shape[0]):
        start = int(cache_lens[b])
        if start < 0 or start + n > k_cache.shape[1]:
            raise ValueError(f"kv_commit: row {b} has cache length {start}; {n} more does not fit in {k_cache.shape[1]}")
        k_cache[b, start : start + n] = k_block[b]
        v_cache[b, start : start + n] = v_block[b]
        cache_lens[b] = start + n
    return k_cache, v_cache, cache_lens


def block_causal_mask(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """[S, S] bool, True where query i may attend key j: block(j) <= block(i).

    Block size 2, S = 5 (last block short)::

        q\\k 0 1 2 3 4
        0    x x . . .
        1    x x . . .
        2    x x x x .
        3    x x x x .
        4    x x x x x
    """
    blocks = torch.arange(seq_len, device=device) // block_size
    return blocks[None, :] <= blocks[:, None]


def reference_block_causal_attention(q, k, v, block_size, scale=None):
    """q [B, S, H, D], k/v [B, S, H_kv, D] -> [B, S, H, D] under block_causal_mask.

    Built block by block: query block j attends to keys [0, end of block j) only, so a key
    a query may not see is never read (a mask with weight 0 would still turn a NaN or inf
    value into NaN, since 0 x NaN is NaN).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    S = q.shape[1]
    out = torch.empty_like(q)
    for start in range(0, S, block_size):
        end = min(start + block_size, S)
        for b in range(q.shape[0]):
            out[b, start:end] = _attention(q[b, start:end], k[b, :end], v[b, :end], scale)
    return out


def _rank_key(value: float, index: int):
    return (math.isnan(value), 0.0 if math.isnan(value) else value, index)


def reference_snapshot_remask(tokens, confidence, num_remask, eligible, mask_id, reset_value=float("inf"), max_k=None):
    """Functional snapshot_remask: returns (new tokens, new confidence, indices [B, max_k]).

    Per row, eligible positions are ordered by (confidence, index) and the first
    num_remask of them are selected (the lowest confidence, ties to the lower index).
    NaN confidence ranks above every number (chosen last), as in torch.sort.
    """
    B, S = tokens.shape
    counts = torch.as_tensor(num_remask).expand(B) if not torch.is_tensor(num_remask) or num_remask.dim() == 0 else num_remask
    counts = [int(c) for c in counts]
    max_k = max(counts, default=0) if max_k is None else max_k
    tokens, confidence = tokens.clone(), confidence.clone()
    indices = torch.full((B, max_k), -1, dtype=torch.int64, device=tokens.device)
    for b in range(B):
        candidates = [i for i in range(S) if bool(eligible[b, i])]
        if counts[b] < 0 or counts[b] > len(candidates) or counts[b] > max_k:
            raise ValueError(f"snapshot_remask: row {b} asks for {counts[b]} of {len(candidates)} eligible positions")
        chosen = sorted(sorted(candidates, key=lambda i: _rank_key(float(confidence[b, i]), i))[: counts[b]])
        for slot, i in enumerate(chosen):
            tokens[b, i] = mask_id
            confidence[b, i] = reset_value
            indices[b, slot] = i
    return tokens, confidence, indices
