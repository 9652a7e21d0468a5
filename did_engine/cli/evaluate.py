"""`did-engine eval`: Gen PPL under an external judge, entropy, NFE, speed, validation NELBO.
The options shared with `ablate` (model, judge, samples) are here too."""

from __future__ import annotations

import json
import os
import sys

from did_engine.cli.options import (CLIError, HelpFormatter, add_config_options, add_device_options,
                                    add_sampler_options, argument_type, check_device, config_values, group,
                                    sampler_config_from_args)
from did_engine.data.tokenizer import start_ids
from did_engine.evaluation.config import EvalConfig, RejectionRule
from did_engine.evaluation.judge import JudgeConfig, load_judge, model_family
from did_engine.evaluation.report import build_report, report_markdown, write_outputs
from did_engine.evaluation.runner import evaluate_model, text_tokenizer, validation_nelbo
from did_engine.modeling.loading import load_for_sampling, resolve_dtype
from did_engine.parsing import positive_int
from did_engine.sampling import SamplerConfig


def add_common_options(p, default_samples: int) -> None:
    """Model, judge, sample-count and sampling options shared by `eval` and `ablate`."""
    src = group(p, "model")
    src.add_argument("--model", required=True,
                     help="a model as `did-engine generate --model` takes it: a checkpoint or Hugging Face "
                          "directory (with a tokenizer.json for text), a .gguf file, a hub name (org/name), "
                          "'default', 'smollm2-135m', or 'preset:NAME' (random weights; needs --tokenizer)")
    src.add_argument("--tokenizer", default=None,
                     help="tokenizer.json (Hugging Face tokenizers) that turns the model's ids into text; "
                          "default: the one beside the weights, else the --data directory's")
    add_device_options(src)
    add_config_options(p, JudgeConfig)
    add_config_options(p, EvalConfig, defaults={"num_samples": default_samples})
    smp = group(p, "samples")
    smp.add_argument("--length", type=argument_type(positive_int), default=None,
                     help="tokens per sample, prompt included (default: the model's context length)")
    smp.add_argument("--no-bos", action="store_true",
                     help="without --prompt-ids, start samples from nothing instead of the BOS token")
    add_config_options(p, SamplerConfig, only=("top_p", "temperature"), title="samples")
    smp.add_argument("--reject-low-entropy", action="store_true",
                     help="BD3-LM's rule: redraw samples whose last --entropy-window tokens have unigram "
                          "entropy below --entropy-threshold nats")
    add_config_options(p, RejectionRule)
    group(p, "output").add_argument("--no-progress", action="store_true", help="hide the progress bars")


def load_model_and_tokenizer(args) -> tuple:
    """The model of --model on --device and the tokenizer that turns its ids into text."""
    check_device(args.device)
    model, beside = load_for_sampling(args.model, args.device, resolve_dtype(args.dtype, args.device))
    return model, text_tokenizer(model, args.model, beside, args.tokenizer, getattr(args, "data", None))


def eval_config_from_args(args, sampler, tokenizer) -> EvalConfig:
    values = config_values(EvalConfig, args)
    if values["prompt"] is None:
        values["prompt"] = start_ids(tokenizer, args.no_bos)
    rejection = RejectionRule(**config_values(RejectionRule, args)) if args.reject_low_entropy else None
    return EvalConfig(sampler=sampler, rejection=rejection, **values)


def judge_from_args(args, model):
    """The judge of --judge for ``model`` (of --model): 'auto' and the family rule see the
    model's base model family."""
    return load_judge(JudgeConfig(**config_values(JudgeConfig, args)), default_device=args.device,
                      model_family=model_family(model, args.model))


def cmd_eval(args) -> int:
    if args.data is not None and not os.path.isdir(args.data):
        raise CLIError(f"--data {args.data!r} is not a directory")
    model, tokenizer = load_model_and_tokenizer(args)
    config = eval_config_from_args(args, sampler_config_from_args(args), tokenizer)
    judge = judge_from_args(args, model)  # a refused or unreachable judge fails before any work
    nelbo = None
    if args.data is not None:
        nelbo = validation_nelbo(model, args.data, block_size=args.nelbo_block_size or args.block_size,
                                 batch_size=args.nelbo_batch_size, max_batches=args.nelbo_batches,
                                 seed=config.seeds[0])
    metrics = evaluate_model(model, tokenizer, judge, config, progress=not args.no_progress)
    report = build_report(args.model, model, judge, config, metrics, nelbo)
    markdown = report_markdown(report)
    paths = write_outputs(report, markdown, args.out, "eval")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(markdown, end="")
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", formatter_class=HelpFormatter,
        help="generative perplexity under an external judge, entropy, NFE, speed, validation NELBO",
        description="Generate --num-samples samples per seed, decode them with the model's tokenizer, and score "
                    "them with a judge causal LM this project did not train (default: SmolLM2-135M, or Gemma 3 270M "
                    "for a SmolLM2-based model; a judge of the model's own base model family is refused). Reports "
                    "Gen PPL (mean of per-sample PPL and token-weighted), unigram entropy, NFE, wall time and "
                    "tokens/s, and with --data the validation NELBO perplexity, as JSON and a markdown table.")
    add_common_options(p, default_samples=32)
    add_sampler_options(p, exclude=("top_p", "temperature"))  # as in `generate`; those two are in "samples"
    val = group(p, "validation NELBO")
    val.add_argument("--data", default=None,
                     help="prepared token dataset directory (did-engine data prepare): report the NELBO "
                          "perplexity of its validation split")
    val.add_argument("--nelbo-block-size", type=argument_type(positive_int), default=None,
                     help="block size of the NELBO (default: --block-size)")
    val.add_argument("--nelbo-batch-size", type=argument_type(positive_int), default=8,
                     help="sequences per NELBO batch")
    val.add_argument("--nelbo-batches", type=argument_type(positive_int), default=None,
                     help="at most this many NELBO batches")
    out = group(p, "report")
    out.add_argument("--out", default=None, help="directory to write eval.json and eval.md into")
    out.add_argument("--json", action="store_true", help="print the JSON report instead of the markdown")
    p.set_defaults(run=cmd_eval)
