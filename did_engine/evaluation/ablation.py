"""Ablations of the DiD sampler on one model, and the quality-speed Pareto frontier.

    did-engine ablate --model DIR --out results/ [--groups draft,block,ratio,policy,speed]

Groups (the paper's comparisons, plus the speed sweep this project aims at):

    draft    BD3-LM draft only vs DiD (draft + one global refinement) vs the MDLM baseline
    block    refine block size in {4, 16, 64, L}                 (the paper: only B = L helps)
    ratio    remask ratio in {0, 0.1, 0.25, 0.5, 0.75, 1.0}      (the paper: U-shape, best 25-50%)
    policy   remask policy snapshot / post-hoc / random          (the paper: snapshot best)
    speed    parallel drafts (top-k, threshold) with and without the global refinement

Every point is evaluated with the same seeds and sample count (``did_engine.evaluation.runner``);
a configuration shared by several groups (the default DiD setting is in four) runs once.
Outputs: ``ablation.json`` (every point's full metrics), ``ablation.md`` (one table per
group plus the frontier) and ``pareto.png`` (Gen PPL against NFE and against seconds per
sample, the Pareto frontier drawn and its points ringed).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from did_engine._plotting import pyplot
from did_engine.evaluation.config import EvalConfig, EvalError
from did_engine.evaluation.report import (METRIC_HEADER, build_report, describe_sampler, fmt, markdown_table,
                                          metric_cells, protocol_line)
from did_engine.evaluation.runner import evaluate_model
from did_engine.parsing import comma_text, finite_float, opt, parse_list, positive_int

GROUPS = ("draft", "block", "ratio", "policy", "speed")
GROUP_TITLES = {
    "draft": "Draft only vs DiD",
    "block": "Refine block size (remask ratio fixed)",
    "ratio": "Remask ratio (global refine block)",
    "policy": "Remask policy",
    "speed": "Parallel drafts with and without refinement",
}


def _refine_block(text: str):
    """A refine block size: an integer, or L (global) for the whole sequence (None)."""
    if text in ("L", "global"):
        return None
    try:
        return int(text)
    except ValueError:
        raise EvalError(f"refine blocks are integers or L, got {text!r}") from None


def _refine_steps(text: str):
    """--refine-steps: model calls per refine block; 0 means one token per call (None)."""
    try:
        steps = int(text)
    except ValueError:
        raise EvalError(f"--refine-steps must be an integer, got {text!r}") from None
    return None if steps == 0 else steps


ABLATION = "ablation"


@dataclass
class AblationConfig:
    """Which points to run. ``None`` as a refine block means the whole sequence (B = L)."""

    groups: tuple = field(default=GROUPS, metadata=opt(
        f"comma separated subset of {','.join(GROUPS)}", group=ABLATION, parse=parse_list))
    draft_block: int = field(default=4, metadata=opt("draft block size B1 of every point", group=ABLATION,
                                                     parse=positive_int))
    refine_blocks: tuple = field(default=(4, 16, 64, None), metadata=opt(
        "refine block sizes of the block group; L = the whole sequence", group=ABLATION,
        parse=lambda text: parse_list(text, _refine_block), show=lambda v: comma_text(["L" if b is None else b for b in v])))
    remask_ratios: tuple = field(default=(0.0, 0.1, 0.25, 0.5, 0.75, 1.0), metadata=opt(
        "remask ratios of the ratio group", group=ABLATION, flag="--ratios",
        parse=lambda text: parse_list(text, float, "--ratios")))
    policies: tuple = ("snapshot", "posthoc", "random")
    ratio: float = field(default=0.25, metadata=opt("remask ratio of every other group", group=ABLATION,
                                                    parse=finite_float))
    refine_steps: int | None = field(default=8, metadata=opt(
        "model calls per refine block (0: one token per call)", group=ABLATION, parse=_refine_steps))
    topk: tuple = field(default=(2, 4), metadata=opt(
        "tokens per step of the speed group's top-k drafts", group=ABLATION,
        parse=lambda text: parse_list(text, int, "--topk")))
    thresholds: tuple = field(default=(0.9, 0.7), metadata=opt(
        "the speed group's threshold drafts", group=ABLATION, parse=lambda text: parse_list(text, float, "--thresholds")))
    mdlm: bool = field(default=True, metadata=opt("include the MDLM baseline in the draft group", group=ABLATION))
    mdlm_steps: int | None = field(default=None, metadata=opt(
        "model calls of the MDLM baseline (default: one token per call)", group=ABLATION, parse=positive_int))

    def __post_init__(self):
        unknown = [g for g in self.groups if g not in GROUPS]
        if unknown or not self.groups:
            raise EvalError(f"unknown ablation group(s) {unknown}; choose from {', '.join(GROUPS)}")
        if any(not 0.0 <= r <= 1.0 for r in (*self.remask_ratios, self.ratio)):
            raise EvalError("remask ratios must be in [0, 1]")
        if any(b is not None and b < 1 for b in self.refine_blocks):
            raise EvalError("refine block sizes must be >= 1 (or L)")


@dataclass
class AblationPoint:
    group: str
    label: str
    sampler: object  # SamplerConfig
    extra: dict = field(default_factory=dict)  # e.g. {"remask_ratio": 0.5} for plotting a sweep


def ablation_points(cfg: AblationConfig, base) -> list:
    """The points of every selected group, in order; ``base`` is a SamplerConfig with the
    shared settings (length, top-p, temperature, ...)."""
    from did_engine.sampling import RefineStage

    def did(ratio=cfg.ratio, block=None, policy="snapshot", **draft):
        return replace(base, method="did", block_size=cfg.draft_block, strategy="first_hitting",
                       stages=[RefineStage(block, ratio, cfg.refine_steps)], remask_policy=policy, **draft)

    def draft_only(**draft):
        return replace(base, method="did", block_size=cfg.draft_block, strategy="first_hitting", stages=[], **draft)

    points = []
    for g in cfg.groups:
        if g == "draft":
            points.append(AblationPoint(g, "draft only (BD3-LM)", draft_only()))
            points.append(AblationPoint(g, "DiD", did()))
            if cfg.mdlm:
                points.append(AblationPoint(g, "MDLM", replace(base, method="mdlm", stages=[],
                                                               mdlm_steps=cfg.mdlm_steps)))
        elif g == "block":
            for b in cfg.refine_blocks:
                points.append(AblationPoint(g, f"refine B={'L' if b is None else b}", did(block=b),
                                            {"refine_block": b}))
        elif g == "ratio":
            for r in cfg.remask_ratios:
                points.append(AblationPoint(g, f"ratio {r:g}", did(ratio=r), {"remask_ratio": r}))
        elif g == "policy":
            for pol in cfg.policies:
                points.append(AblationPoint(g, pol, did(policy=pol), {"policy": pol}))
        elif g == "speed":
            drafts = [("first-hitting", {})] + [(f"top-{k}", dict(strategy="topk", tokens_per_step=k))
                                                for k in cfg.topk]
            drafts += [(f"threshold {t:g}", dict(strategy="threshold", threshold=t)) for t in cfg.thresholds]
            for name, kw in drafts:
                points.append(AblationPoint(g, f"{name} draft", replace(draft_only(), **kw)))
                points.append(AblationPoint(g, f"{name} + refine", replace(did(), **kw)))
    return points


def config_key(sampler, length: int) -> str:
    """Identical generations get identical keys (refine blocks >= L are the global block)."""
    d = asdict(sampler)
    d["stages"] = [{**asdict(s), "block_size": None if s.block_size is None or s.block_size >= length
                    else s.block_size} for s in sampler.stages]
    if sampler.method == "mdlm":
        for k in ("block_size", "strategy", "tokens_per_step", "threshold", "stages", "remask_policy"):
            d.pop(k, None)
    else:
        d.pop("mdlm_steps", None)
    if not sampler.stages:
        d.pop("remask_policy", None)
    if sampler.strategy != "topk":
        d.pop("tokens_per_step", None)
    if sampler.strategy != "threshold":
        d.pop("threshold", None)
    return json.dumps(d, sort_keys=True)


def pareto_front(xs, ys) -> list:
    """Indices of the points no other point beats: x' <= x and y' <= y with one strict (lower is better)."""
    idx = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        if not (x == x and y == y):  # NaN
            continue
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y)
                        for j, (x2, y2) in enumerate(zip(xs, ys)) if j != i and x2 == x2 and y2 == y2)
        if not dominated:
            idx.append(i)
    return sorted(idx, key=lambda i: (xs[i], ys[i]))


def run_ablation(model, tokenizer, judge, cfg: AblationConfig, eval_config: EvalConfig, progress: bool = False):
    """Evaluate every distinct point; return {"points": [...], "runs": {key: metrics}}."""
    length = eval_config.sampler.length or int(model.config.model_length)
    points = ablation_points(cfg, eval_config.sampler)
    runs, order = {}, []
    for p in points:
        key = config_key(p.sampler, length)
        if key not in runs:
            runs[key] = None
            order.append((key, p))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc="ablation", unit="config")
    for key, p in order:
        if bar is not None:
            bar.set_postfix_str(f"{p.group}: {p.label}")
        runs[key] = evaluate_model(model, tokenizer, judge, replace(eval_config, sampler=p.sampler), progress=False)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    rows = []
    for p in points:
        key = config_key(p.sampler, length)
        m = runs[key]
        rows.append({"group": p.group, "label": p.label, "sampler": describe_sampler(p.sampler),
                     "config_id": [k for k, _ in order].index(key), **p.extra, "metrics": m})
    return rows, len(order)


def _frontier_table(rows, x_key: str) -> tuple:
    uniq = {}
    for r in rows:
        uniq.setdefault(r["config_id"], r)
    cand = list(uniq.values())
    xs = [_x(r, x_key) for r in cand]
    ys = [r["metrics"]["gen_ppl"]["mean_per_sample"] for r in cand]
    return cand, pareto_front(xs, ys)


def _x(row, x_key):
    m = row["metrics"]
    return m["nfe"]["total"] if x_key == "nfe" else m["seconds"]["per_sample"]


def ablation_markdown(report: dict) -> str:
    rows = report["points"]
    lines = ["## did-engine ablate", "", protocol_line(report), ""]
    front_nfe, front_sec = set(report["frontier"]["nfe"]), set(report["frontier"]["seconds"])
    for g in report["ablation"]["groups"]:
        mine = [r for r in rows if r["group"] == g]
        table = []
        for r in mine:
            mark = ("N" if r["config_id"] in front_nfe else "") + ("S" if r["config_id"] in front_sec else "")
            table.append([r["label"], r["sampler"]] + metric_cells(r["metrics"]) + [mark or "-"])
        lines += [f"### {GROUP_TITLES[g]}", "", markdown_table(["point", "sampler"] + METRIC_HEADER + ["frontier"],
                                                              table), ""]
    lines += ["### Pareto frontier (lower Gen PPL and lower cost)", ""]
    by_id = {r["config_id"]: r for r in rows}
    for name, key in (("NFE", "nfe"), ("seconds per sample", "seconds")):
        table = [[by_id[i]["sampler"], fmt(_x(by_id[i], key), 3 if key == "seconds" else 1),
                  fmt(by_id[i]["metrics"]["gen_ppl"]["mean_per_sample"])] for i in report["frontier"][key]]
        lines += [f"Against {name}:", "", markdown_table(["sampler", name, "Gen PPL (mean)"], table), ""]
    lines.append("frontier column: N = on the Gen PPL-vs-NFE frontier, S = on the Gen PPL-vs-seconds frontier. "
                 f"{report['distinct_configs']} distinct configurations were run.")
    return "\n".join(lines) + "\n"


def _label_log_axis(axis) -> None:
    """Plain labels at 1, 2, 5 x 10^k on a log axis, none on the minor ticks (matplotlib's
    default labels minor ticks on short ranges, where they overlap)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_minor_formatter(NullFormatter())


def plot_pareto(report: dict, path: str) -> str | None:
    """Gen PPL (mean of per-sample) against NFE and against seconds per sample, one PNG
    (None without matplotlib)."""
    plt = pyplot("pareto.png")
    if plt is None:
        return None

    uniq = {}
    for r in report["points"]:
        uniq.setdefault(r["config_id"], r)
    pts = list(uniq.values())
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = {g: c for g, c in zip(GROUPS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"))}
    for ax, key, name in ((axes[0], "nfe", "NFE (model calls per batch)"),
                          (axes[1], "seconds", "seconds per sample")):
        xs = [_x(r, key) for r in pts]
        ys = [r["metrics"]["gen_ppl"]["mean_per_sample"] for r in pts]
        for r, x, y in zip(pts, xs, ys):
            ax.scatter([x], [y], color=colors[r["group"]], s=28, zorder=3)
            ax.annotate(r["sampler"].replace("draft B=", "B=").replace(" first-hitting", ""), (x, y), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        front = [i for i, r in enumerate(pts) if r["config_id"] in set(report["frontier"][key])]
        front.sort(key=lambda i: xs[i])
        if front:
            ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="black", lw=1.2,
                    label="Pareto frontier", zorder=2)
            ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=110, facecolors="none",
                       edgecolors="black", zorder=4)
        ax.set_xlabel(name)
        ax.set_ylabel("Gen PPL (mean of per-sample)")
        if all(v > 0 for v in xs) and max(xs) / max(min(xs), 1e-12) > 20:
            ax.set_xscale("log")
            _label_log_axis(ax.xaxis)
        finite = [v for v in ys if v == v and v > 0]
        if finite and max(finite) / min(finite) > 20:
            ax.set_yscale("log")
            _label_log_axis(ax.yaxis)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=g) for g, c in colors.items()
               if any(r["group"] == g for r in pts)]
    handles.append(plt.Line2D([], [], color="black", label="Pareto frontier"))
    axes[1].legend(handles=handles, fontsize=8, loc="best")
    j, c = report["judge"], report["config"]
    fig.suptitle(f"{report['model']['spec']}: judge {j['name']}, {c['num_samples_per_seed']} samples x seeds "
                 f"{c['seeds']}, length {c['sampler']['length'] or report['model']['model_length']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def build_ablation_report(model_spec, model, judge, cfg: AblationConfig, eval_config: EvalConfig, rows,
                          distinct: int) -> dict:
    report = build_report(model_spec, model, judge, eval_config, metrics=None)
    report["command"] = "ablate"
    del report["metrics"], report["nelbo"]
    report["ablation"] = {**asdict(cfg), "groups": list(cfg.groups)}
    report["points"] = rows
    report["distinct_configs"] = distinct
    report["frontier"] = {}
    for key in ("nfe", "seconds"):
        cand, front = _frontier_table(rows, key)
        report["frontier"][key] = [cand[i]["config_id"] for i in front]
    return report
