"""Drawing tokens and choosing positions, with BD3-LM's conventions.

Token sampling follows BD3-LM: SUBS (the mask token is never predicted), temperature,
nucleus (top-p) filtering, and a float64 Gumbel/exponential race for the draw. The
recorded confidence is the model's probability of the token (SUBS softmax at temperature
1, before nucleus filtering), so the ``snapshot`` and ``posthoc`` remask policies rank by
the same quantity and differ only in *when* it is measured.

Each row's draws depend on that row alone (its logits and, with per-row generators, its
own generator), never on how many rows are drawn together: see the sampler's notes on
randomness and batching.
"""

from __future__ import annotations

import torch

from did_engine.diffusion import subs_logits
from did_engine.errors import UserError


def row_generators(generator, batch_size: int):
    """None, one generator for all rows, or a list of per-row generators."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    gens = list(generator)
    if len(gens) != batch_size or not all(isinstance(g, torch.Generator) for g in gens):
        raise UserError(f"generator must be a torch.Generator or a list of {batch_size} of them")
    return gens


def _keep_prefix(sorted_p: torch.Tensor, top_p: float) -> torch.Tensor:
    """Descending probabilities [M, k] -> the same with every token after the nucleus zeroed."""
    drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # the mass before a token already suffices
    return sorted_p.masked_fill(drop, 0.0)


def _nucleus_groups(probs: torch.Tensor, top_p: float, first_k: int = 1024):
    """The nucleus of each row of probs [M, V]: the smallest set of most probable tokens
    whose mass reaches top_p, as groups of rows ``(rows [M] bool, p [m, C], ids [m, C])``:
    candidate probabilities (zero outside the nucleus, not renormalised) and their token
    ids in ascending order (None: the column is the token id).

    A trained model's nucleus is usually small, so each row first tries its top ``first_k``
    tokens (a partial selection, much cheaper than sorting the vocabulary, and the draw
    then touches only those); rows whose top ``first_k`` mass falls short of top_p (flat
    distributions) take the full sort. The kept set is the same either way, and the choice
    depends on the row alone, so a row's draw does not depend on the other rows.
    """
    if top_p >= 1.0:
        return [(torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device), probs, None)]
    k = min(first_k, probs.shape[-1])
    # [M]: the nucleus reaches past the first k tokens. Certain without the topk when even k
    # copies of the row's largest probability fall short (flat rows).
    short = probs.amax(-1) * k < top_p
    if not short.all():
        head_p, head_ids = probs[~short].topk(k, dim=-1)  # [M', k], descending
        head_short = head_p.sum(-1) < top_p
        short[~short.clone()] = head_short
        head_p, head_ids = head_p[~head_short], head_ids[~head_short]
    groups = []
    # Candidates go back to token-id order: the draw must not depend on how topk/sort order
    # tied probabilities, which can change with the number of rows.
    if not short.all():
        ids, order = head_ids.sort(dim=-1)
        groups.append((~short, _keep_prefix(head_p, top_p).gather(-1, order), ids))
    if short.any():
        groups.append((short, _nucleus_by_buckets(probs[short], top_p), None))
    return groups


def _nucleus_by_buckets(probs: torch.Tensor, top_p: float, mantissa_bits: int = 5) -> torch.Tensor:
    """The nucleus of each row of probs [m, V] (float64) as probabilities [m, V], zero
    outside it, without sorting the vocabulary: what sorting descending and keeping every
    token whose preceding mass is below top_p keeps.

    The float32 bit pattern of a probability, shifted right, is a bucket index that never
    decreases as the probability grows (2^mantissa_bits buckets per power of two). Bucket
    masses summed from the top find the boundary bucket, where the running mass first
    reaches top_p: buckets above it are kept whole, buckets below dropped, and only the
    boundary bucket's tokens (a few hundred even for a flat row) are ordered, by topk.
    """
    m, V = probs.shape
    shift = 23 - mantissa_bits
    key = (probs.float().view(torch.int32) >> shift).long()  # [m, V], monotone in p
    n_keys = (0x7F800000 >> shift) + 1  # up to +inf's bucket
    mass = torch.zeros(m, n_keys, dtype=probs.dtype, device=probs.device).scatter_add_(1, key, probs)
    above = mass.flip(-1).cumsum(-1).flip(-1) - mass  # [m, n_keys]: mass of the higher buckets
    reaches = (above + mass >= top_p) & (mass > 0)
    # The boundary: the highest bucket where the running mass reaches top_p (none: keep all).
    boundary = torch.where(reaches.any(-1), n_keys - 1 - reaches.flip(-1).int().argmax(-1), -1)  # [m]
    keep = key > boundary[:, None]
    in_boundary = key == boundary[:, None]
    count = int(in_boundary.sum(-1).max()) if m else 0
    if count:
        vals, ids = probs.masked_fill(~in_boundary, -1.0).topk(count, dim=-1)  # [m, count], descending
        before = above.gather(1, boundary.clamp(min=0)[:, None]) + vals.clamp(min=0).cumsum(-1) - vals.clamp(min=0)
        keep.scatter_(1, ids, (vals >= 0) & (before < top_p) | keep.gather(1, ids))
    return probs * keep


def _draw(weights: torch.Tensor, generator) -> torch.Tensor:
    """One sample per row of weights [m, C] (float64, need not sum to 1) by an exponential
    race, argmax w / E with E ~ Exp(1): BD3-LM's float64 Gumbel-max draw."""
    u = torch.rand(weights.shape, dtype=torch.float64, device=weights.device, generator=generator)
    race = u.clamp_min_(1e-300).log_().neg_()  # E = -log(u), in place: these rows span the vocabulary
    return torch.div(weights, race, out=race).argmax(-1)


def _sample_tokens(probs: torch.Tensor, top_p: float, rows: torch.Tensor, generators) -> torch.Tensor:
    """Nucleus sampling of one token per row of probs [M, V]; rows [M] = the batch row of each
    (a list of per-row generators draws each batch row's positions with its own generator)."""
    tokens = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    for sel, p, ids in _nucleus_groups(probs, top_p):
        if isinstance(generators, list):
            choice = torch.empty(p.shape[0], dtype=torch.int64, device=p.device)
            group_rows = rows[sel]
            for b in group_rows.unique().tolist():
                mine = group_rows == b
                choice[mine] = _draw(p[mine], generators[b])
        else:
            choice = _draw(p, generators)
        tokens[sel] = choice if ids is None else ids.gather(-1, choice[:, None])[:, 0]
    return tokens


class TokenDrawer:
    """Samples tokens at chosen positions from raw logits, with BD3-LM's conventions."""

    def __init__(self, mask_id: int, temperature: float, top_p: float, generators):
        self.mask_id, self.temperature, self.top_p, self.generators = mask_id, temperature, top_p, generators

    # Rows of logits handled at once: the float64 probabilities and the nucleus sort of a
    # whole batch-64 global step (16k rows x 50k tokens) would need tens of GB.
    chunk_elements = 1 << 25

    def __call__(self, logits: torch.Tensor, where: torch.Tensor):
        """logits [M, V] at the M true positions of where [B, W] (row-major) -> tokens [M],
        confidence [M]."""
        rows = where.nonzero()[:, 0]  # [M], ascending: positions of row 0 first
        tokens = torch.empty(rows.shape[0], dtype=torch.int64, device=logits.device)
        confidence = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
        for start, end in self._chunks(rows, logits.shape[-1]):
            # Drawn from float32 logits whatever the model's dtype (float64 models included).
            lg = subs_logits(logits[start:end].float(), self.mask_id)  # [m, V]
            if self.temperature == 0:
                tok = lg.argmax(-1)
            else:
                scaled = lg.double() if self.temperature == 1 else lg.double() / self.temperature
                probs = torch.softmax(scaled, dim=-1)
                del scaled
                tok = _sample_tokens(probs, self.top_p, rows[start:end], self.generators)
                del probs
            tokens[start:end] = tok
            # The model's probability of the token (temperature 1). A full softmax, not a
            # log-sum-exp: torch may split a reduction over the vocabulary across threads
            # when there are few rows, which would make a row's value depend on the others.
            confidence[start:end] = torch.softmax(lg, dim=-1).gather(-1, tok[:, None])[:, 0]
        return tokens, confidence

    def _chunks(self, rows: torch.Tensor, vocab: int):
        """Slices [start, end) of the M rows, about chunk_elements / V rows each. With
        per-row generators a batch row's positions are never split (they draw from their
        own generator in order), so a row's draws do not depend on the other rows."""
        M, per_chunk = rows.shape[0], max(1, self.chunk_elements // max(vocab, 1))
        if not isinstance(self.generators, list):
            return [(s, min(s + per_chunk, M)) for s in range(0, M, per_chunk)]
        bounds = torch.cat([torch.tensor([0], device=rows.device), (rows[1:] != rows[:-1]).nonzero()[:, 0] + 1,
                            torch.tensor([M], device=rows.device)]).tolist()  # batch-row boundaries
        chunks, start = [], 0
        for i in range(1, len(bounds)):  # grow a chunk by whole batch rows while it fits
            if bounds[i] - start > per_chunk and bounds[i - 1] > start:
                chunks.append((start, bounds[i - 1]))
                start = bounds[i - 1]
        if start < M:
            chunks.append((start, M))
        return chunks


def random_pick(candidates: torch.Tensor, counts: torch.Tensor, generators, k_max: int) -> torch.Tensor:
    """Per row b, counts[b] positions of candidates [B, W] chosen uniformly -> [B, W] bool."""
    B, W = candidates.shape
    if isinstance(generators, list):
        scores = torch.stack([torch.rand(W, generator=g, device=candidates.device) for g in generators])
    else:
        scores = torch.rand((B, W), generator=generators, device=candidates.device)
    return top_by_score(scores.masked_fill(~candidates, -1.0), candidates, counts, k_max)


def top_by_score(scores: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor, k_max: int) -> torch.Tensor:
    """Per row, the counts[b] candidates with the highest scores -> [B, W] bool.

    ``k_max`` is a host-side bound on counts (not read from the device: no synchronisation)."""
    chosen = torch.zeros_like(candidates)
    k = min(k_max, candidates.shape[1])
    if k <= 0:
        return chosen
    scores = scores.masked_fill(~candidates, float("-inf"))
    top = scores.topk(k, dim=-1).indices  # [B, k]
    keep = torch.arange(k, device=scores.device)[None, :] < counts[:, None]
    chosen.scatter_(1, top, keep)
    return chosen & candidates

