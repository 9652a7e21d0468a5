"""The mix-scale loss: the noise of a global batch (identical on every rank) and the mean
NELBO over a batch whose rows have different block sizes (a module, so DDP wraps one
forward per backward)."""

from __future__ import annotations

import torch
import torch.nn as nn

from did_engine.diffusion import draw_block_noise, model_nelbo_terms
from did_engine.modeling.base import BlockDiffusionBase
from did_engine.training.config import TrainConfig


def draw_batch_noise(cfg: TrainConfig, n_rows: int, seq_len: int, probs: dict, clip: dict, generator, schedule):
    """Block size per row, then per size (ascending) its rows' t and masks: CPU tensors
    block_size [G] int64, t [G, L] float32, masked [G, L] bool."""
    sizes = list(probs)
    weights = torch.tensor([probs[b] for b in sizes], dtype=torch.float64)
    which = torch.multinomial(weights, n_rows, replacement=True, generator=generator)  # [G]
    block_size = torch.tensor(sizes, dtype=torch.int64)[which]
    t = torch.empty(n_rows, seq_len, dtype=torch.float32)
    masked = torch.empty(n_rows, seq_len, dtype=torch.bool)
    for b in sizes:
        rows = (block_size == b).nonzero().flatten()
        if rows.numel() == 0:
            continue
        lo, hi = clip[b]
        t_b, m_b = draw_block_noise(rows.numel(), seq_len, b, lo, hi, generator, schedule, antithetic=cfg.antithetic,
                                    resample=cfg.resample, keep_first=cfg.ignore_bos)
        t[rows], masked[rows] = t_b, m_b
    return block_size, t, masked


class MixScaleLoss(nn.Module):
    """Mean NELBO over every token of a batch whose rows have different block sizes.

    forward(x0 [B, L], masked [B, L] bool, t [B, L], block_size [B] int) -> (loss, stats):
    rows are grouped by block size (each size has its own mask and, for b = L, no x_0
    half), one forward per group; stats is a detached float64 [2 * n_sizes] of per-size
    (term sum, token count) for logging, in ``sizes`` order.
    """

    def __init__(self, model: BlockDiffusionBase, sizes, schedule, amp_dtype=None):
        super().__init__()
        self.model = model
        self.sizes = [int(b) for b in sizes]
        self.schedule = schedule
        self.amp_dtype = amp_dtype

    def forward(self, x0, masked, t, block_size):
        B, L = x0.shape
        total = x0.new_zeros((), dtype=torch.float32)
        stats = torch.zeros(2 * len(self.sizes), dtype=torch.float64)
        sizes_here = block_size.tolist()
        for j, b in enumerate(self.sizes):
            rows = [i for i, s in enumerate(sizes_here) if s == b]
            if not rows:
                continue
            idx = torch.tensor(rows, device=x0.device)
            x0_g, m_g, t_g = x0[idx], masked[idx], t[idx]  # [R, L]
            terms = model_nelbo_terms(self.model, x0_g, m_g, t_g, b, self.schedule, self.amp_dtype)  # [R, L] float32
            part = terms.sum()
            total = total + part
            stats[2 * j] = part.detach().double().item()
            stats[2 * j + 1] = terms.numel()
        return total / (B * L), stats
