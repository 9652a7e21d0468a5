"""Masked (absorbing-state) diffusion pieces shared by the loss and the sampler."""

from __future__ import annotations

import torch


def subs_log_probs(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS parameterisation (MDLM / BD3-LM): raw logits -> log p(x_0 | x_t) in float32 (float64 stays float64).

    ::

        logits [B, S, V] raw model output; x_t [B, S] current tokens -> [B, S, V]

    - the mask token is never a prediction: its logit is -inf before the softmax;
    - positions already unmasked carry their token over: a one-hot (log 1 = 0 on the
      token, -inf elsewhere), whatever the model said there.
    """
    if logits.shape[:2] != x_t.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and x_t {tuple(x_t.shape)} disagree on [B, S]")
    if logits.dtype != torch.float64:
        logits = logits.float()
    is_mask_column = torch.arange(logits.shape[-1], device=logits.device) == mask_id  # [V]
    log_probs = torch.log_softmax(logits.masked_fill(is_mask_column, float("-inf")), dim=-1)
    # Out of place throughout, so the loss can backpropagate through it.
    carry = torch.full_like(log_probs, float("-inf")).scatter(-1, x_t[..., None], 0.0)
    return torch.where((x_t != mask_id)[..., None], carry, log_probs)
