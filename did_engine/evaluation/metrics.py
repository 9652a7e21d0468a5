"""Plain metrics: unigram entropy, the judge's score of a text, Gen PPL both ways.

    gen_ppl.mean_per_sample   mean over samples of exp(NLL_i / n_i)   (BD3-LM's number)
    gen_ppl.token_weighted    exp(sum_i NLL_i / sum_i n_i)
    entropy                   unigram entropy (nats) of each sample's generated token ids

(runner.summarize adds model calls, wall time and tokens/s of a generation run.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def unigram_entropy(ids) -> float:
    """Entropy (nats) of the empirical distribution of the token ids in ``ids``."""
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if ids.numel() == 0:
        return 0.0
    _, counts = torch.unique(ids, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log()).sum())


@dataclass
class JudgeScore:
    """The judge's verdict on one text: summed NLL (nats) over ``tokens`` scored tokens."""

    nll: float
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def gen_ppl_summary(scores) -> dict:
    """Gen PPL both ways from a list of JudgeScore (texts with no scored token are skipped)."""
    scored = [s for s in scores if s.tokens > 0]
    if not scored:
        return {"mean_per_sample": float("nan"), "token_weighted": float("nan"), "median": float("nan"),
                "std": float("nan"), "scored_samples": 0, "unscored_samples": len(scores), "judge_tokens": 0}
    ppls = torch.tensor([s.ppl for s in scored], dtype=torch.float64)
    total_nll = sum(s.nll for s in scored)
    total_tokens = sum(s.tokens for s in scored)
    return {
        "mean_per_sample": float(ppls.mean()),
        "token_weighted": math.exp(total_nll / total_tokens),
        "median": float(ppls.median()),
        "std": float(ppls.std()) if len(scored) > 1 else 0.0,
        "scored_samples": len(scored),
        "unscored_samples": len(scores) - len(scored),
        "judge_tokens": total_tokens,
    }
