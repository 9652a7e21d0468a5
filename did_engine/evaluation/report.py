"""Reports: a sampler's one-line label, the metric cells and markdown tables, the protocol
line (judge, samples, seeds, settings), the JSON report and the files it is written to."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict

from did_engine.evaluation.config import SEED_STRIDE, EvalConfig
from did_engine.evaluation.judge import Judge, model_family


def _sampler_settings(cfg) -> dict:
    d = asdict(cfg)
    d["stages"] = [asdict(s) for s in cfg.stages]
    return d


def describe_config(config: EvalConfig) -> dict:
    return {"num_samples_per_seed": config.num_samples, "seeds": list(config.seeds),
            "batch_size": config.batch_size, "prompt_ids": config.prompt,
            "sample_seed_rule": f"torch seed of sample i under base seed s = s * {SEED_STRIDE} + i",
            "sampler": _sampler_settings(config.sampler)}


def fmt(x, digits=2) -> str:
    """A metric for a table: 2 decimals by default, "-" for None, nan and inf spelled out."""
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if math.isinf(x):
            return "inf"
        return f"{x:.{digits}f}"
    return str(x)


def describe_sampler(cfg) -> str:
    """A one-line label of a SamplerConfig, e.g. 'draft B=4 first_hitting + global:0.25:8 snapshot'."""
    if cfg.method == "mdlm":
        return f"MDLM global, {f'{cfg.mdlm_steps} calls' if cfg.mdlm_steps else 'one token per call'}"
    draft = {"first_hitting": "first-hitting", "topk": f"top-{cfg.tokens_per_step}/step",
             "threshold": f"threshold {cfg.threshold}"}[cfg.strategy]
    text = f"draft B={cfg.block_size} {draft}"
    for s in cfg.stages:
        text += f" + {'global' if s.block_size is None else s.block_size}:{s.remask_ratio}:{s.steps or 'auto'}"
        text += " (reused context)" if s.reuse_context else ""
    if cfg.stages:
        text += f" {cfg.remask_policy}"
    return text


METRIC_HEADER = ["Gen PPL (mean)", "Gen PPL (token)", "entropy", "NFE", "s/sample", "tokens/s"]


def metric_cells(m: dict) -> list:
    return [fmt(m["gen_ppl"]["mean_per_sample"]), fmt(m["gen_ppl"]["token_weighted"]), fmt(m["entropy"]["mean"]),
            fmt(m["nfe"]["total"], 1), fmt(m["seconds"]["per_sample"], 3), fmt(m["tokens_per_second"], 1)]


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def protocol_line(report: dict) -> str:
    j, c, m = report["judge"], report["config"], report["model"]
    rej = c.get("rejection")
    rej_text = (f"low-entropy rejection on (last {rej['window']} tokens < {rej['threshold']} nats, "
                f"<= {rej['max_redraws']} redraws)" if rej else "no low-entropy rejection")
    s = c["sampler"]
    length = s["length"] or m["model_length"]
    judge_family = f"{j['family']} family, " if j.get("family") else ""
    model_family = f" ({m['family']} family)" if m.get("family") else ""
    return (f"Judge: {j['name']} ({judge_family}{j['parameters'] / 1e6:.0f}M parameters, {j['dtype']}, "
            f"context {j['context']}, stride {j['stride']}). {c['num_samples_per_seed']} samples x "
            f"{len(c['seeds'])} seed(s) {c['seeds']}, batch {c['batch_size']}, length {length}, "
            f"top-p {s['top_p']}, temperature {s['temperature']}; {rej_text}. Model: {m['spec']}{model_family}. "
            f"NFE = model calls per generate() call, commit passes included.")


def report_markdown(report: dict) -> str:
    m = report["metrics"]
    header = ["sampler"] + METRIC_HEADER + (["val NELBO PPL"] if report.get("nelbo") else [])
    row = [describe_sampler_dict(report["config"]["sampler"])] + metric_cells(m)
    if report.get("nelbo"):
        row.append(fmt(report["nelbo"]["ppl"]))
    lines = ["## did-engine eval", "", markdown_table(header, [row]), "", protocol_line(report), ""]
    g = m["gen_ppl"]
    lines.append(f"Gen PPL: mean of per-sample PPL {fmt(g['mean_per_sample'])} (median {fmt(g['median'])}, "
                 f"std {fmt(g['std'])}), token-weighted {fmt(g['token_weighted'])} over {g['judge_tokens']} judge "
                 f"tokens; per seed: " + ", ".join(f"{k}: {fmt(v)}" for k, v in g["per_seed"].items()) + ".")
    nfe = m["nfe"]
    lines.append("NFE by stage: " + "; ".join(f"{st} " + ", ".join(f"{k} {fmt(v, 1)}" for k, v in kinds.items())
                                               for st, kinds in nfe["by_stage"].items())
                 + f" (total {fmt(nfe['total'], 1)}, {fmt(nfe['without_commit'], 1)} without commits).")
    lines.append(f"Time: {fmt(m['seconds']['generation'])} s generating ({m['generate_calls']} calls, "
                 f"{m['generated_tokens']} tokens), {fmt(m['seconds']['judge'])} s judging.")
    if m["rejection"]:
        r = m["rejection"]
        lines.append(f"Rejection: {r['redraws']} redraws over {r['samples_redrawn']} samples; "
                     f"{r['still_low_entropy']} still below the threshold (kept).")
    if report.get("nelbo"):
        n = report["nelbo"]
        lines.append(f"Validation NELBO: {fmt(n['nelbo'], 4)} nats/token (PPL {fmt(n['ppl'])}) over {n['tokens']} "
                     f"tokens of {n['data']}, block size {n['block_size']}.")
    return "\n".join(lines) + "\n"


def describe_sampler_dict(d: dict) -> str:
    from did_engine.sampling import RefineStage, SamplerConfig

    return describe_sampler(SamplerConfig(**{**d, "stages": [RefineStage(**s) for s in d["stages"]]}))


def model_description(spec: str, model) -> dict:
    cfg = model.config
    return {"spec": spec, "family": model_family(model, spec),  # base model family; None: unknown
            "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": cfg.vocab_size,
            "model_length": cfg.model_length, "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}


def build_report(model_spec, model, judge: Judge, config: EvalConfig, metrics: dict, nelbo=None) -> dict:
    import did_engine

    cfg = describe_config(config)
    cfg["rejection"] = asdict(config.rejection) if config.rejection else None
    return {"did_engine_version": did_engine.__version__, "command": "eval",
            "model": model_description(model_spec, model), "judge": judge.describe(), "config": cfg,
            "metrics": metrics, "nelbo": nelbo}


def write_outputs(report: dict, markdown: str, out: str | None, stem: str) -> list:
    """Write STEM.json and STEM.md into directory ``out``; return the paths."""
    if out is None:
        return []
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"{stem}.json"), os.path.join(out, f"{stem}.md")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=2, allow_nan=True)
    with open(paths[1], "w") as f:
        f.write(markdown)
    return paths
