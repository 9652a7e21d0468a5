"""The did_engine ops: thin wrappers over ``torch.ops.did_engine.*`` plus their fake kernels.

The kernels live in ``csrc/`` (C++ for CPU, CUDA for GPUs) and validate every argument
themselves, so calling ``torch.ops.did_engine.<name>`` directly is just as safe; these
wrappers add defaults, docstrings and Python-friendly argument types. The fake kernels
registered here give output metadata without computing, so the ops work under
``torch.compile`` and ``torch.library.opcheck``. The pure-PyTorch ground truth of each op
is in :mod:`did_engine.ops.reference`.

Argument errors raise ``ValueError`` naming the op and the argument, here and in the
kernels alike (not ``did_engine.errors.UserError``: inside the package a bad op argument is
a bug of ours, and keeps its traceback).

Layouts follow FlashAttention: ``[batch, seq, heads, head_dim]`` with the last dim
contiguous (other strides are accepted).
"""

from __future__ import annotations

import numbers
import operator

import torch

from did_engine import _C  # noqa: F401  (loads the library that registers the ops)
from did_engine.ops import reference

# The op list, written once: tests, build_info() and benchmarks iterate over it.
OPS = ("block_decode_attention", "kv_commit", "block_causal_attention", "snapshot_remask")

__all__ = [*OPS, "OPS", "reference"]

_ops = torch.ops.did_engine


def _exact_int(op: str, name: str, value) -> int:
    """``value`` as an int if it is exactly an integer that fits in int64 (int, numpy
    integer, integral 0-d tensor); floats such as 2.5 or 2.0, bools and other types are
    refused, never truncated."""
    if isinstance(value, bool) or type(value).__name__ == "bool_" or (torch.is_tensor(value) and value.dtype == torch.bool):
        raise ValueError(f"{op}: {name} must be an int, got the bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}") from None
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{op}: {name} = {value} does not fit in int64")
    return value


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
    weighted sum accumulate in float32. ``scale`` defaults to 1/sqrt(D) and must be finite
    in float32. Keys at or past ``cache_lens[b]`` are never read: NaN or inf there has no
    effect. A row's result does not depend on the other rows of the batch or on the thread
    count: row b of a batch equals the op applied to row b alone, bit for bit.
    """
    return _ops.block_decode_attention.default(q, k_cache, v_cache, k_block, v_block, cache_lens, scale)


def kv_commit(k_cache, v_cache, k_block, v_block, cache_lens) -> None:
    """Append a finished block's keys/values to the caches, in place.

    ::

        k_cache, v_cache [B, S_max, H_kv, D]   written at [b, cache_lens[b] : cache_lens[b] + n]
        k_block, v_block [B, n, H_kv, D]
        cache_lens       int32 [B]             advanced by n, in place

    Refuses (ValueError, nothing written) when any row would overflow S_max, and when an
    output overlaps itself (an expanded, stride-0 view) or shares memory with another
    argument (k_cache and v_cache may be interleaved views of one buffer, never
    overlapping ones). Each row is copied on its own: a row's result does not depend on
    the other rows of the batch or on the thread count.
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
    ``block_size`` must be an int (2.5 is refused, not truncated); ``scale`` defaults to
    1/sqrt(D) and must be finite in float32. A key a query does not see is never read, so
    NaN or inf there reaches only the queries that see it. A row's result does not depend
    on the other rows of the batch or on the thread count: row b of a batch equals the op
    applied to row b alone, bit for bit.
    """
    block_size = _exact_int("block_causal_attention", "block_size", block_size)
    return _ops.block_causal_attention.default(q, k, v, block_size, scale)


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
    pass it explicitly in a sampling loop (e.g. the stage's largest count). ``num_remask``,
    ``max_k`` and ``mask_id`` must be ints (2.5 is refused, not truncated). Rows are
    selected independently: a row's result does not depend on the other rows of the batch
    or on the thread count.
    """
    op = "snapshot_remask"
    B = tokens.shape[0] if torch.is_tensor(tokens) and tokens.dim() >= 1 else 0
    S = tokens.shape[1] if torch.is_tensor(tokens) and tokens.dim() == 2 else None
    device = tokens.device if torch.is_tensor(tokens) else None
    mask_id = _exact_int(op, "mask_id", mask_id)
    if isinstance(reset_value, bool) or not isinstance(reset_value, numbers.Real):
        raise ValueError(f"{op}: reset_value must be a float, got {type(reset_value).__name__} {reset_value!r}")
    if max_k is not None:
        max_k = _exact_int(op, "max_k", max_k)
    if torch.is_tensor(num_remask):
        if num_remask.dtype.is_floating_point or num_remask.dtype.is_complex or num_remask.dtype == torch.bool:
            raise ValueError(f"{op}: num_remask must be an int or an int tensor [B], got a {num_remask.dtype} tensor")
        if device is not None and num_remask.device != device:
            raise ValueError(f"{op}: num_remask is on {num_remask.device} but tokens is on {device}; "
                            "all arguments must be on one device")
        if max_k is None:
            max_k = int(num_remask.max()) if num_remask.numel() else 0
            derived = "num_remask.max()"
        else:
            derived = None
    else:
        num_remask = _exact_int(op, "num_remask", num_remask)
        if num_remask < 0:
            raise ValueError(f"{op}: num_remask must be >= 0, got {num_remask}")
        derived = "num_remask" if max_k is None else None
        if max_k is None:
            max_k = num_remask
        num_remask = torch.full((B,), num_remask, dtype=torch.int64, device=device)
    # max_k taken from num_remask: a count above the row length is num_remask's mistake.
    if derived is not None and S is not None and max_k > S:
        raise ValueError(f"{op}: {derived} = {max_k} exceeds the row length S={S} (at most S positions can be remasked)")
    return _ops.snapshot_remask.default(tokens, confidence, num_remask, eligible, mask_id, float(reset_value), max_k)


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
