"""The did_engine ops: thin wrappers over ``torch.ops.did_engine.*`` plus their fake kernels.

The kernels live in ``csrc/`` (C++ for CPU, CUDA for GPUs) and validate every argument
themselves, so calling ``torch.ops.did_engine.<name>`` directly is just as safe; these
wrappers add defaults, docstrings and Python-friendly argument types. The fake kernels
registered here give output metadata without computing, so the ops work under
``torch.compile`` and ``torch.library.opcheck``. The pure-PyTorch ground truth of each op
is in :mod:`did_engine.ops.reference`.

Layouts follow FlashAttention: ``[batch, seq, heads, head_dim]`` with the last dim
contiguous (other strides are accepted).
"""

from __future__ import annotations

import torch

from did_engine import _C  # noqa: F401  (loads the library that registers the ops)
from did_engine.ops import reference

__all__ = [
    "block_decode_attention",
    "kv_commit",
    "block_causal_attention",
    "snapshot_remask",
    "reference",
]

_ops = torch.ops.did_engine


def block_decode_attention(q, k_cache, v_cache, k_block, v_block, cache_lens, scale=None):
    """Attention of the active block against a KV cache plus itself, with no mask.

    ::

        q          [B, n, H, D]        queries of the active block (n tokens)
        k_cache    [B, S_max, H_kv, D] committed keys; row b holds cache_lens[b] valid ones
        v_cache    [B, S_max, H_kv, D]
        k_block    [B, n, H_kv, D]     the active block's own keys/values (not yet committed)
        v_block    [B, n, H_kv, D]
        cache_lens int32 [B]           0 <= cache_lens[b] <= S_max
        returns    [B, n, H, D]        dtype of q

    Query head h uses key/value head h // (H // H_kv) (grouped-query attention). Every
    query of row b sees the same keys, in this order::

        keys:  cache[b, 0] ... cache[b, len_b - 1] | block[b, 0] ... block[b, n - 1]
        mask:  x           ... x                   | x           ... x            (none)

    Inputs may be float32, bfloat16 or float16 (all the same); scores, softmax and the
    weighted sum accumulate in float32. ``scale`` defaults to 1/sqrt(D).
    """
    return _ops.block_decode_attention.default(q, k_cache, v_cache, k_block, v_block, cache_lens, scale)


def kv_commit(k_cache, v_cache, k_block, v_block, cache_lens) -> None:
    """Append a finished block's keys/values to the caches, in place.

    ::

        k_cache, v_cache [B, S_max, H_kv, D]   written at [b, cache_lens[b] : cache_lens[b] + n]
        k_block, v_block [B, n, H_kv, D]
        cache_lens       int32 [B]             advanced by n, in place

    Refuses (ValueError, nothing written) when any row would overflow S_max.
    """
    _ops.kv_commit.default(k_cache, v_cache, k_block, v_block, cache_lens)


def block_causal_attention(q, k, v, block_size: int, scale=None):
    """Block-causal attention without a cache (prompt prefill, reference forward).

    ::

        q [B, S, H, D], k/v [B, S, H_kv, D] -> [B, S, H, D]

    Query block j (positions j*b .. j*b+b-1) attends to every key of blocks 0..j. S need
    not be a multiple of ``block_size``: the last block is short. Block size 2, S = 5::

        q\\k 0 1 2 3 4
        0    x x . . .
        1    x x . . .
        2    x x x x .
        3    x x x x .
        4    x x x x x

    ``block_size >= S`` is full bidirectional attention; ``block_size == 1`` is causal.
    """
    return _ops.block_causal_attention.default(q, k, v, int(block_size), scale)


def snapshot_remask(tokens, confidence, num_remask, eligible, mask_id: int, reset_value: float = float("inf"),
                    max_k: int | None = None):
    """Remask the lowest-confidence eligible tokens of each row, in place (DiD's refine step).

    ::

        tokens      int64   [B, S]   mask_id written at the selected positions
        confidence  float32 [B, S]   reset_value written at the selected positions
        num_remask  int, or int tensor [B]   how many to select in each row
        eligible    bool    [B, S]   False for prompt tokens and anything not to touch
        returns     int64   [B, max_k]       selected positions, ascending, padded with -1

    Row b selects the ``num_remask[b]`` eligible positions with the lowest confidence;
    equal confidences go to the lower index first (deterministic); NaN ranks above every
    number. Asking for more than a row's eligible count is an error.

    ``max_k`` (the output width) defaults to ``num_remask`` when it is an int, and to
    ``num_remask.max()`` when it is a tensor, which costs a host synchronisation on a GPU:
    pass it explicitly in a sampling loop (e.g. the stage's largest count).
    """
    B = tokens.shape[0] if torch.is_tensor(tokens) and tokens.dim() >= 1 else 0
    device = tokens.device if torch.is_tensor(tokens) else None
    if isinstance(num_remask, bool) or not (isinstance(num_remask, int) or torch.is_tensor(num_remask)):
        raise ValueError(f"snapshot_remask: num_remask must be an int or an int tensor [B], got {type(num_remask).__name__}")
    if isinstance(num_remask, int):
        if num_remask < 0:
            raise ValueError(f"snapshot_remask: num_remask must be >= 0, got {num_remask}")
        if max_k is None:
            max_k = num_remask
        num_remask = torch.full((B,), num_remask, dtype=torch.int64, device=device)
    elif max_k is None:
        max_k = int(num_remask.max()) if num_remask.numel() else 0
    return _ops.snapshot_remask.default(tokens, confidence, num_remask, eligible, int(mask_id), float(reset_value),
                                        int(max_k))


# ---------------------------------------------------------------------------------------
# Fake kernels: output metadata only (torch.compile, FakeTensor, opcheck). A call mixing
# meta and real tensors also lands here, so the device check must be repeated.


def _check_one_device(op: str, **tensors):
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{op}: {name} is on {device} but {first_name} is on {first}; "
                             "all arguments must be on one device")


@torch.library.register_fake("did_engine::block_decode_attention")
def _block_decode_attention_fake(q, k_cache, v_cache, k_block, v_block, cache_lens, scale=None):
    _check_one_device("block_decode_attention", q=q, k_cache=k_cache, v_cache=v_cache, k_block=k_block,
                      v_block=v_block, cache_lens=cache_lens)
    torch._check(q.dim() == 4, lambda: "block_decode_attention: q must be 4-D [B, n, H, D]")
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("did_engine::kv_commit")
def _kv_commit_fake(k_cache, v_cache, k_block, v_block, cache_lens):
    _check_one_device("kv_commit", k_cache=k_cache, v_cache=v_cache, k_block=k_block, v_block=v_block,
                      cache_lens=cache_lens)
    return None


@torch.library.register_fake("did_engine::block_causal_attention")
def _block_causal_attention_fake(q, k, v, block_size, scale=None):
    _check_one_device("block_causal_attention", q=q, k=k, v=v)
    torch._check(q.dim() == 4, lambda: "block_causal_attention: q must be 4-D [B, S, H, D]")
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("did_engine::snapshot_remask")
def _snapshot_remask_fake(tokens, confidence, num_remask, eligible, mask_id, reset_value, max_k):
    _check_one_device("snapshot_remask", tokens=tokens, confidence=confidence, num_remask=num_remask,
                      eligible=eligible)
    torch._check(tokens.dim() == 2, lambda: "snapshot_remask: tokens must be 2-D [B, S]")
    return tokens.new_empty((tokens.shape[0], max_k), dtype=torch.int64)
