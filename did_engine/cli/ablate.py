"""`did-engine ablate`: the DiD paper's ablations and the quality-speed Pareto frontier on one
model; its ablation options are AblationConfig's fields."""

from __future__ import annotations

import os
import sys

from did_engine.cli.evaluate import add_common_options, eval_config_from_args, judge_from_args, load_model_and_tokenizer
from did_engine.cli.options import HelpFormatter, add_config_options, config_values, group
from did_engine.evaluation.ablation import (AblationConfig, ablation_markdown, build_ablation_report, plot_pareto,
                                            run_ablation)
from did_engine.evaluation.report import write_outputs
from did_engine.sampling import SamplerConfig


def cmd_ablate(args) -> int:
    cfg = AblationConfig(**config_values(AblationConfig, args))  # checked before the model is loaded
    model, tokenizer = load_model_and_tokenizer(args)
    base = SamplerConfig(length=args.length, top_p=args.top_p, temperature=args.temperature)
    eval_config = eval_config_from_args(args, base, tokenizer)
    judge = judge_from_args(args, model)
    rows, distinct = run_ablation(model, tokenizer, judge, cfg, eval_config, progress=not args.no_progress)
    report = build_ablation_report(args.model, model, judge, cfg, eval_config, rows, distinct)
    markdown = ablation_markdown(report)
    write_outputs(report, markdown, args.out, "ablation")
    plotted = plot_pareto(report, os.path.join(args.out, "pareto.png"))
    print(markdown, end="")
    print(f"wrote {args.out}/ablation.json, ablation.md{', pareto.png' if plotted else ''}", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ablate", formatter_class=HelpFormatter,
        help="the DiD paper's ablations and the quality-speed Pareto frontier on one model",
        description="Evaluate groups of sampler configurations on one model with the same judge, seeds and "
                    "sample count: draft only vs DiD, refine block size, remask ratio, remask policy, and "
                    "parallel drafts with and without refinement. Writes ablation.json, ablation.md and "
                    "pareto.png (Gen PPL against NFE and against seconds, the Pareto frontier marked).")
    add_common_options(p, default_samples=16)
    group(p, "ablation").add_argument("--out", required=True,
                                      help="directory for ablation.json, ablation.md and pareto.png")
    add_config_options(p, AblationConfig)
    p.set_defaults(run=cmd_ablate)
