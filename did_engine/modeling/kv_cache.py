"""A static KV cache for block decoding: K and V after rotary, preallocated, per-row lengths."""

from __future__ import annotations

import torch

from did_engine import ops


class BlockKVCache:
    """Keys and values of committed (clean) blocks, for every layer.

    ::

        k, v     [n_layers, B, capacity, H, D]  rows filled up to lengths[b]
        lengths  int32 [B]                      committed tokens held for row b
        offset   int64 [B]                      absolute position of entry 0 of row b

    K is stored after rotary, so decoding never recomputes or re-rotates the cache. A new
    block of row b sits at absolute positions ``offset[b] + lengths[b] + arange(n)``.

    Sliding window: when a commit would overflow ``capacity``, the oldest entries of that
    row are dropped (rounded up to whole blocks, as BD3-LM does) and ``offset`` advances.
    Positions keep counting up, and because rotary attention depends only on the distance
    between query and key, attention over the kept window equals BD3-LM's, which re-numbers
    the window from 0 (up to float rounding of the rotary angles).
    """

    def __init__(self, n_layers: int, batch_size: int, capacity: int, n_heads: int, head_dim: int,
                 device=None, dtype=torch.float32):
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"BlockKVCache needs batch_size >= 1 and capacity >= 1, got {batch_size}, {capacity}")
        shape = (n_layers, batch_size, capacity, n_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # One length row per layer: kv_commit advances the lengths it is given in place, and
        # every layer commits the same block. Row 0 is the public view.
        self._layer_lengths = torch.zeros((n_layers, batch_size), device=device, dtype=torch.int32)
        self.offset = torch.zeros(batch_size, device=device, dtype=torch.int64)
        # A host-side upper bound on every row's length, kept without reading the device:
        # make_room needs the lengths only when this bound says a row might overflow, so a
        # commit inside the window never synchronises. It holds as long as lengths change
        # only through this class (make_room before each commit, set_lengths, copy_, reset):
        # treat ``lengths`` as read-only, and advance the bound yourself (make_room) when
        # replaying a captured commit.
        self._length_bound = 0

    @property
    def lengths(self) -> torch.Tensor:
        """int32 [B], read-only: write lengths with set_lengths (see _length_bound)."""
        return self._layer_lengths[0]

    def layer_lengths(self, layer: int) -> torch.Tensor:
        """int32 [B]: the lengths layer ``layer`` attends over. Equal to ``lengths`` between
        commits; while a block is committed layer by layer, the layers already done are
        ahead by the block (commit_layer advances this tensor in place)."""
        return self._layer_lengths[layer]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Memory held by the cache, in bytes."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self._layer_lengths, self.offset))

    def positions(self, n: int) -> torch.Tensor:
        """Absolute positions [B, n] of a block of n tokens placed after each row's cache."""
        start = self.offset + self.lengths.to(torch.int64)  # [B]
        return start[:, None] + torch.arange(n, device=start.device)

    def reset(self) -> None:
        self._layer_lengths.zero_()
        self.offset.zero_()
        self._length_bound = 0

    def set_lengths(self, length) -> None:
        """Mark every row as holding ``length`` entries (an int, or one per row: int [B]),
        written directly into k and v."""
        per_row = torch.as_tensor(length).tolist()
        per_row = per_row if isinstance(per_row, list) else [per_row] * self.batch_size
        if len(per_row) != self.batch_size or not all(0 <= n <= self.capacity for n in per_row):
            raise ValueError(f"set_lengths needs {self.batch_size} lengths in [0, {self.capacity}], got {length!r}")
        self._layer_lengths.copy_(torch.tensor(per_row, dtype=torch.int32))  # [B] into every layer's row
        self._length_bound = max(per_row)

    @property
    def known_empty(self) -> bool:
        """True when every row is known to be empty without reading the device."""
        return self._length_bound == 0

    def copy_(self, other: "BlockKVCache") -> "BlockKVCache":
        """Make this cache hold what ``other`` holds (same shapes), in place."""
        if self.k.shape != other.k.shape:
            raise ValueError(f"copy_ needs caches of one shape, got {tuple(other.k.shape)} into {tuple(self.k.shape)}")
        self.k.copy_(other.k), self.v.copy_(other.v)
        self._layer_lengths.copy_(other._layer_lengths), self.offset.copy_(other.offset)
        self._length_bound = other._length_bound
        return self

    def make_room(self, n: int, block_size: int | None = None) -> None:
        """Make room for a block of n that is committed next: drop each row's oldest
        entries where n more would not fit (the sliding window)."""
        if n > self.capacity:
            raise ValueError(f"a block of {n} tokens cannot fit in a cache of capacity {self.capacity}")
        if self._length_bound + n <= self.capacity:  # no row can overflow: nothing to read
            self._length_bound += n
            return
        lengths = self.lengths.tolist()
        unit = block_size or n
        for b, length in enumerate(lengths):
            overflow = length + n - self.capacity
            if overflow <= 0:
                continue
            drop = min(length, -(-overflow // unit) * unit)  # whole blocks, at most everything
            keep = length - drop
            self.k[:, b, :keep] = self.k[:, b, drop:length].clone()
            self.v[:, b, :keep] = self.v[:, b, drop:length].clone()
            self._layer_lengths[:, b] = keep
            self.offset[b] += drop
            lengths[b] = keep
        self._length_bound = max(lengths) + n

    def commit_layer(self, layer: int, k_block: torch.Tensor, v_block: torch.Tensor) -> None:
        """Append layer `layer`'s K/V of a finished block: k_block, v_block [B, n, H, D]
        (after make_room(n), which keeps the host-side length bound)."""
        ops.kv_commit(self.k[layer], self.v[layer], k_block, v_block, self._layer_lengths[layer])

    def __repr__(self) -> str:
        n_layers, B, cap, H, D = self.k.shape
        return (f"BlockKVCache(layers={n_layers}, batch={B}, capacity={cap}, heads={H}, head_dim={D}, "
                f"dtype={self.k.dtype}, device={self.k.device}, {self.nbytes / 2**20:.1f} MiB)")
