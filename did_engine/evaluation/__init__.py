"""Evaluation: Gen PPL under an external judge, entropy, model calls; the paper's ablations."""
