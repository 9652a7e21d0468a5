"""Evaluation: Gen PPL under an external judge, entropy, model calls; the paper's ablations.

config.py (what to run, EvalError), metrics.py (entropy, Gen PPL), judge.py (the judge LM
and its cache), runner.py (generate, judge, summarise; validation NELBO), report.py (tables
and the JSON report), ablation.py (groups of sampler settings and the Pareto frontier).
"""

from did_engine.evaluation.config import EvalConfig, EvalError, RejectionRule, sample_seed  # noqa: F401
from did_engine.evaluation.judge import DEFAULT_JUDGE, Judge, JudgeConfig, load_judge  # noqa: F401
from did_engine.evaluation.metrics import JudgeScore, gen_ppl_summary, unigram_entropy  # noqa: F401
from did_engine.evaluation.runner import evaluate_model, generate_samples, validation_nelbo  # noqa: F401
