"""RowByRow: a model computed one batch row at a time, for tests of batch independence.

Shared by the sampler and evaluation tests (import it as ``from support.rowwise import RowByRow``,
like ``conftest``'s helpers).
"""

from __future__ import annotations

import torch


class RowByRow(torch.nn.Module):
    """The same model computed one batch row at a time, each row in fresh tensors.

    Its forwards are row-independent by construction: a row's logits are computed by the
    same calls, on tensors of the same shapes, whatever else is in the batch. (The plain
    batched model is row-independent only as far as the BLAS is: MKL rounds a 1-row matmul
    differently from a 3-row one.) Padding that the sampler adds for other rows' sake (the
    reused-context positions beyond a row's own count) is trimmed, as it never yields logits.
    """

    supports_logit_positions = True

    def __init__(self, model):
        super().__init__()
        self.inner, self.mask_id, self.config = model, model.mask_id, model.config
        self.supports_commit_and_decode = model.supports_commit_and_decode

    @staticmethod
    def _row(t, b):
        return None if t is None else t[b:b + 1].clone()

    def _rows(self, B, call, logit_positions):
        out = [call(b, self._row(logit_positions, b)) for b in range(B)]
        return torch.cat(out) if logit_positions is not None else torch.cat(out, 0)

    def new_kv_cache(self, batch_size, max_len=None):
        return [self.inner.new_kv_cache(1, max_len=max_len) for _ in range(batch_size)]

    def decode(self, block, cache, logit_positions=None):
        return self._rows(block.shape[0], lambda b, lp: self.inner.decode(self._row(block, b), cache[b],
                                                                          logit_positions=lp), logit_positions)

    def commit(self, block, cache, block_size=None):
        forwards = [self.inner.commit(self._row(block, b), cache[b], block_size=block_size)
                    for b in range(block.shape[0])]
        return forwards[0]  # every row runs the same number

    def commit_and_decode(self, clean, block, cache, logit_positions=None):
        return self._rows(block.shape[0], lambda b, lp: self.inner.commit_and_decode(
            self._row(clean, b), self._row(block, b), cache[b], logit_positions=lp), logit_positions)

    def forward(self, tokens, block_size=None, logit_positions=None):
        return self._rows(tokens.shape[0], lambda b, lp: self.inner(self._row(tokens, b), block_size=block_size,
                                                                    logit_positions=lp), logit_positions)

    def refine_forward(self, tokens, context, positions=None, write=None, logit_positions=None):
        def row(b, lp):
            if positions is None:
                return self.inner.refine_forward(self._row(tokens, b), context[b], logit_positions=lp)
            keep = write[b] if write is not None else torch.ones_like(positions[b], dtype=torch.bool)
            return self.inner.refine_forward(self._row(tokens, b), context[b], positions[b][keep][None].clone(),
                                             write=keep[keep][None], logit_positions=lp[:, keep])
        assert positions is None or logit_positions is not None, "the sampler asks for packed logits"
        return self._rows(tokens.shape[0], row, logit_positions)
