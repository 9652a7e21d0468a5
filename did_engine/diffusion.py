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
