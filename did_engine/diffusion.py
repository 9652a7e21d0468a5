"""Masked (absorbing-state) diffusion pieces shared by the loss and the sampler: SUBS, the
log-linear noise schedule, per-block noise draws and the NELBO."""

from __future__ import annotations

import math

import torch


def subs_logits(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS parameterisation (MDLM / BD3-LM) of raw logits: the mask token is never a
    prediction, so its logit becomes -inf. A softmax over the result is p(x_0 | x_t) at a
    masked position; unmasked positions carry their token over (see subs_log_probs), which
    the sampler gets by drawing at masked positions only.

    ::

        logits [..., V] raw model output -> [..., V] float32 (float64 stays float64), a new
        tensor (out of place, so the loss can backpropagate through it)
    """
    if logits.dtype != torch.float64:
        logits = logits.float()
    is_mask_column = torch.arange(logits.shape[-1], device=logits.device) == mask_id  # [V]
    return logits.masked_fill(is_mask_column, float("-inf"))


def subs_log_probs(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """log p(x_0 | x_t) under SUBS, every position and token: [B, S, V] float32 (float64 stays).

    ::

        logits [B, S, V] raw model output; x_t [B, S] current tokens -> [B, S, V]

    - masked positions: log_softmax(subs_logits(logits));
    - positions already unmasked carry their token over: a one-hot (log 1 = 0 on the
      token, -inf elsewhere), whatever the model said there.
    """
    if logits.shape[:2] != x_t.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and x_t {tuple(x_t.shape)} disagree on [B, S]")
    log_probs = torch.log_softmax(subs_logits(logits, mask_id), dim=-1)
    carry = torch.full_like(log_probs, float("-inf")).scatter(-1, x_t[..., None], 0.0)
    return torch.where((x_t != mask_id)[..., None], carry, log_probs)


# ---------------------------------------------------------------------------------------
# Noise schedule and the NELBO (BD3-LM / MDLM, absorbing state, continuous time)
#
# With alpha_t the probability that a token is still clean at noise level t, the NELBO of a
# masked diffusion model is (MDLM eq. 10, BD3-LM eq. 8), per token and per block:
#
#     E_t E_{x_t} [ alpha'_t / (1 - alpha_t) * log p_theta(x_0 | x_t) ]   at masked positions
#
# (unmasked positions contribute nothing: SUBS carries them over, log 1 = 0). BD3-LM draws
# one t per block, uniformly from [eps_min, eps_max] (the clipped schedule), and averages
# the per-token terms over every token of the batch, masked or not.


class LogLinearSchedule:
    """The log-linear schedule: a token is masked with probability t (alpha_t = 1 - t).

    - weight of the NELBO: -alpha'_t / (1 - alpha_t) = 1 / t;
    - total noise sigma(t) = -log(1 - t), clamped at -log(eps): what a time-conditioned
      model is shown (BD3-LM zeroes it when time_conditioning is off, so do we).
    """

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps
        self.sigma_max = -math.log(eps)

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.clamp(-torch.log1p(-t), max=self.sigma_max)


SCHEDULES = {"loglinear": LogLinearSchedule}


def get_schedule(name: str):
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose from {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[name]()


def sample_block_times(n_rows: int, n_blocks: int, eps_min: float, eps_max: float, generator=None,
                       antithetic: bool = True) -> torch.Tensor:
    """One noise level per block, uniform on [eps_min, eps_max]: float32 [n_rows, n_blocks].

    Antithetic (stratified) sampling as in BD3-LM: the n = n_rows * n_blocks draws are
    (u_i + i) / n mod 1 for i = 0..n-1, one per stratum of [0, 1), which lowers the
    variance of the batch's loss without biasing it.
    """
    u = torch.rand(n_rows, n_blocks, generator=generator)  # [R, nb]
    if antithetic:
        n = n_rows * n_blocks
        offset = torch.arange(n, dtype=torch.float32).view(n_rows, n_blocks) / n
        u = (u / n + offset) % 1
    return u * (eps_max - eps_min) + eps_min


def draw_block_noise(n_rows: int, seq_len: int, block_size: int, eps_min: float = 1e-3, eps_max: float = 1.0,
                     generator=None, schedule=None, antithetic: bool = True, resample: bool = False,
                     keep_first: bool = False, max_resample: int = 1000):
    """Noise of one block size for n_rows sequences: (t [R, L] float32, masked [R, L] bool).

    Every block b of a row gets one t (repeated over its tokens); each token is masked
    with probability schedule.mask_prob(t). ``resample`` redraws, as BD3-LM does with a
    clipped schedule, the masks of blocks whose fraction of masked tokens falls outside
    [eps_min, eps_max] (a bound at its default, 1e-3 or 1, is not enforced).
    ``keep_first`` never masks position 0 (BD3-LM's ignore_bos: the BOS token).
    All draws come from ``generator`` on the CPU, so they do not depend on the device.
    """
    if seq_len % block_size:
        raise ValueError(f"block size {block_size} does not divide the sequence length {seq_len}")
    schedule = schedule or LogLinearSchedule()
    n_blocks = seq_len // block_size
    t = sample_block_times(n_rows, n_blocks, eps_min, eps_max, generator, antithetic)  # [R, nb]
    t = t.repeat_interleave(block_size, dim=1)  # [R, L]
    p = schedule.mask_prob(t)
    masked = torch.rand(n_rows, seq_len, generator=generator) < p  # [R, L]
    lower, upper = eps_min > 1e-3, eps_max < 1.0
    if resample and (lower or upper):
        counts = torch.arange(block_size + 1) / block_size
        feasible = ((counts >= eps_min) | (not lower)) & ((counts <= eps_max) | (not upper))
        if not feasible.any():
            raise ValueError(f"no masked fraction k/{block_size} lies in [{eps_min}, {eps_max}]: "
                             "widen the clipping interval or turn resampling off")
        for _ in range(max_resample):
            frac = masked.view(n_rows, n_blocks, block_size).float().mean(-1)  # [R, nb]
            bad = ((frac < eps_min) & lower) | ((frac > eps_max) & upper)
            if not bad.any():
                break
            fresh = torch.rand(n_rows, seq_len, generator=generator) < p
            bad = bad.repeat_interleave(block_size, dim=1)
            masked = torch.where(bad, fresh, masked)
    if keep_first:
        masked[:, 0] = False
    return t, masked


def masked_nll(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, mask_id: int) -> torch.Tensor:
    """-log p_theta(x_0 | x_t) under SUBS, float32 [B, L] (float64 logits stay float64).

    logits [B, L, V] raw; x0 [B, L] clean tokens; masked [B, L] bool (x_t == mask).
    At unmasked positions SUBS puts probability 1 on the carried token: the term is 0.
    Equal to gathering :func:`subs_log_probs` at x_0, without its [B, L, V] tensors.
    """
    if logits.dtype != torch.float64:
        logits = logits.float()
    if mask_id == logits.shape[-1] - 1:
        # SUBS's normaliser leaves the mask column out. When it is the last column (every
        # BD3-LM and did_engine model) a slice does that without subs_logits' [B, L, V]
        # copy, which autograd would keep alive until the backward.
        lse = torch.logsumexp(logits[..., :mask_id], dim=-1)  # [B, L]
    else:
        lse = torch.logsumexp(subs_logits(logits, mask_id), dim=-1)
    target = logits.gather(-1, x0[..., None]).squeeze(-1)  # [B, L]
    return torch.where(masked, lse - target, torch.zeros_like(lse))


def nelbo_terms(logits, x0, masked, t, mask_id: int, schedule=None) -> torch.Tensor:
    """Per-token NELBO terms [B, L]: weight(t) * -log p(x_0 | x_t) at masked positions, else 0.

    Their mean over all tokens is BD3-LM's training loss; its sum over a sequence is an
    upper bound on -log p(x_0) (with t drawn from [1e-3, 1]).
    """
    schedule = schedule or LogLinearSchedule()
    nll = masked_nll(logits, x0, masked, mask_id)
    return schedule.loss_weight(t.to(nll.dtype)) * nll


# ---------------------------------------------------------------------------------------
# noise -> x_t -> forward -> NELBO terms: the one path of training, validation, the
# clipping search and evaluation

DEFAULT_EPS = (1e-3, 1.0)  # the unclipped noise interval: a valid NELBO


def model_nelbo_terms(model, x0: torch.Tensor, masked: torch.Tensor, t: torch.Tensor, block_size: int,
                      schedule=None, amp_dtype=None) -> torch.Tensor:
    """Per-token NELBO terms [R, L] of ``model`` on drawn noise (float32; 0 where unmasked).

    x0 [R, L] clean tokens; masked [R, L] bool and t [R, L] the noise (as draw_block_noise
    returns it, on x0's device); one block size for all rows (b = L: a plain global
    forward on x_t, else the cat(x_t, x_0) block diffusion forward). ``amp_dtype`` runs the
    forward (only) under autocast; the terms are computed from its logits in float32.
    """
    schedule = schedule or LogLinearSchedule()
    mask_id = model.config.mask_id
    x_t = torch.where(masked, mask_id, x0)
    with torch.autocast(device_type=x0.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        logits = model(x_t, x0=x0, block_size=block_size, sigma=schedule.sigma(t[:, 0]))  # [R, L, V]
    return nelbo_terms(logits, x0, masked, t, mask_id, schedule)


def _rows_of(dataset):
    """(n, fetch(indices) -> int64 [k, L]) for a TokenDataset, a tensor or an array [N, L]."""
    import numpy as np

    from did_engine.errors import UserError

    if hasattr(dataset, "batch"):
        return len(dataset), dataset.batch
    tensor = torch.as_tensor(np.asarray(dataset) if not torch.is_tensor(dataset) else dataset).long()
    if tensor.dim() != 2:
        raise UserError(f"dataset must be [N, L] token ids, got shape {tuple(tensor.shape)}")
    return tensor.shape[0], lambda idx: tensor[torch.as_tensor(np.asarray(idx), dtype=torch.long)]


@torch.no_grad()
def evaluate_nelbo(model, dataset, *, block_size, batch_size: int = 8, max_batches: int | None = None,
                   generator=None, eps_min: float = DEFAULT_EPS[0], eps_max: float = DEFAULT_EPS[1],
                   ignore_bos: bool = True, schedule: str = "loglinear", antithetic: bool = True) -> dict:
    """Monte Carlo NELBO of ``dataset`` under block size ``block_size`` (None or >= L: global).

    One t per block per sequence, uniform on [eps_min, eps_max] (the default [1e-3, 1] is
    BD3-LM's validation NELBO; a clipped interval gives a biased estimate), one masking
    draw per sequence, in dataset order. Returns::

        {"nelbo": mean per-token NELBO (nats), "ppl": exp(nelbo), "tokens": tokens counted,
         "sequences": n, "block_size": b}

    With ``ignore_bos`` position 0 is never masked and not counted (as BD3-LM). Draws come
    from ``generator`` (default: a CPU generator seeded with 0), so the value reproduces.
    """
    import numpy as np

    from did_engine.errors import UserError

    n, fetch = _rows_of(dataset)
    sched = get_schedule(schedule)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens, sequences = 0.0, 0, 0
    try:
        for i, start in enumerate(range(0, n, batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            x0 = fetch(np.arange(start, min(start + batch_size, n))).to(device)  # [R, L]
            R, L = x0.shape
            b = L if block_size is None or block_size >= L else int(block_size)
            t, masked = draw_block_noise(R, L, b, eps_min, eps_max, g, sched, antithetic=antithetic,
                                         keep_first=ignore_bos)
            terms = model_nelbo_terms(model, x0, masked.to(device), t.to(device), b, sched)  # [R, L]
            if ignore_bos:
                terms = terms[:, 1:]
            total += terms.double().sum().item()
            tokens += terms.numel()
            sequences += R
    finally:
        model.train(was_training)
    if tokens == 0:
        raise UserError("evaluate_nelbo: the dataset is empty")
    nelbo = total / tokens
    return {"nelbo": nelbo, "ppl": math.exp(min(nelbo, 700.0)), "tokens": tokens, "sequences": sequences,
            "block_size": b}
