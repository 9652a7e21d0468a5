"""The ``did-engine`` command line.

    did-engine generate [--model PATH] [options]   draft-then-refine generation (default: the embedded model)
    did-engine eval --model PATH [options]          Gen PPL under an external judge, entropy, NFE, speed
    did-engine ablate --model PATH --out DIR        the DiD ablations and the quality-speed frontier
    did-engine info                                 what the compiled op library contains
    did-engine data prepare --out DIR [options]     build a token dataset (corpus, tokenizer, splits)

Run ``did-engine generate --help`` for every option.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import sys

import torch

from did_engine.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Subcommands defined beside the code they run: each module offers add_parser(subparsers),
# which adds its parser(s) with set_defaults(run=function(args) -> exit status).
SUBCOMMAND_MODULES: tuple = ("did_engine.data.prepare", "did_engine.training.trainer", "did_engine.evaluation.evaluate", "did_engine.evaluation.ablation")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless X is None / False (nothing to say)
    or the help text already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False) or re.search(r"\bdefault(:|\s|\))", text, re.IGNORECASE):
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``, exit status
    2, instead of the usage block (which runs to a dozen lines for ``generate``)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CLIError(UserError):
    """A user mistake: printed as one line, exit status 2."""


def _parse_stage(text: str):
    """BLOCK:RATIO[:STEPS], BLOCK an int or 'global'; STEPS an int or 'auto' (one token per call)."""
    from did_engine.sampling.sampler import RefineStage

    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"stage {text!r} must be BLOCK:RATIO[:STEPS], e.g. global:0.25:8")
    try:
        block = None if parts[0] in ("global", "L", "") else int(parts[0])
        ratio = float(parts[1])
        steps = 8 if len(parts) == 2 else (None if parts[2] in ("auto", "") else int(parts[2]))
        return RefineStage(block, ratio, steps)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad stage {text!r}: {exc}") from None


def _parse_ids(text: str):
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be integers separated by commas, got {text!r}") from None


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= minimum, else an error saying `expected <what>`."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def finite_float(text: str) -> float:
    """A float that is not NaN or infinite (a NaN temperature would make every token 0)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def start_ids(tokenizer, no_bos: bool) -> list:
    """[BOS] when the tokenizer has one: every training sequence starts with it (BD3-LM's
    wrapping), so samples do too, as in BD3-LM's sampler; [] with no_bos or no tokenizer."""
    if no_bos or tokenizer is None or getattr(tokenizer, "bos_id", None) is None:
        return []
    return [int(tokenizer.bos_id)]


def add_sampler_options(parser: argparse.ArgumentParser, *, top_p_and_temperature: bool = True) -> None:
    """The draft, refinement and sampling options (of `generate` and `eval`); read them back
    with sampler_config_from_args."""
    draft = parser.add_argument_group("draft")
    draft.add_argument("--method", default="did", choices=["did", "mdlm"],
                       help="did: block draft + refinement stages; mdlm: global sampling from all-mask (baseline)")
    draft.add_argument("--block-size", type=positive_int, default=4, help="draft block size")
    draft.add_argument("--strategy", default="first_hitting", choices=["first_hitting", "topk", "threshold"],
                       help="which masked positions each draft step fills: one uniformly chosen (BD3-LM), "
                            "the k most confident, or all above a threshold")
    draft.add_argument("--tokens-per-step", type=positive_int, default=2, help="k of the topk strategy")
    draft.add_argument("--threshold", type=finite_float, default=0.9, help="tau of the threshold strategy")
    draft.add_argument("--mdlm-steps", type=positive_int, default=None, help="model calls of the mdlm method "
                                                                             "(default: one per token)")
    refine = parser.add_argument_group("refinement")
    refine.add_argument("--stage", dest="stages", type=_parse_stage, action="append", default=None,
                        help="refinement stage BLOCK:RATIO[:STEPS] (repeatable; BLOCK 'global' = whole "
                             "sequence; STEPS model calls per block, 'auto' = one token per call). "
                             "Default: one stage global:0.25:8")
    refine.add_argument("--no-refine", action="store_true", help="draft only (plain BD3-LM sampling)")
    refine.add_argument("--reuse-context", action="store_true",
                        help="global stages: after one full forward, re-run only the remasked positions "
                             "against the stored K/V of the rest (approximate; a step then costs about "
                             "RATIO of a full one)")
    refine.add_argument("--policy", default="snapshot", choices=["snapshot", "posthoc", "random"],
                        help="which tokens a stage remasks: lowest snapshot confidence (DiD), lowest "
                             "probability under a re-scoring forward, or random")
    samp = parser.add_argument_group("sampling")
    if top_p_and_temperature:
        samp.add_argument("--top-p", type=finite_float, default=0.9, help="nucleus sampling mass")
        samp.add_argument("--temperature", type=finite_float, default=1.0, help="softmax temperature (0: greedy)")
    samp.add_argument("--eos-id", type=nonnegative_int, default=None, help="end-of-sequence token id")
    samp.add_argument("--stop-at-eos", action="store_true", help="end each sample at its first EOS")


def sampler_config_from_args(args):
    """The SamplerConfig that add_sampler_options' arguments describe."""
    from did_engine.sampling.sampler import RefineStage, SamplerConfig

    stages = [] if args.no_refine else (args.stages if args.stages is not None else [RefineStage(None, 0.25, 8)])
    if getattr(args, "reuse_context", False):
        stages = [dataclasses.replace(s, reuse_context=True) if s.block_size is None else s for s in stages]
    return SamplerConfig(length=args.length, block_size=args.block_size, strategy=args.strategy,
                         tokens_per_step=args.tokens_per_step, threshold=args.threshold, stages=stages,
                         remask_policy=args.policy, method=args.method, mdlm_steps=args.mdlm_steps,
                         top_p=args.top_p, temperature=args.temperature, eos_id=args.eos_id,
                         stop_at_eos=args.stop_at_eos)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="did-engine", description="Block diffusion LMs with the DiD sampler.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate", formatter_class=HelpFormatter,
        help="generate text: block-diffusion draft, then refinement stages",
        description="Draft the sequence with small blocks and an exact KV cache, recording each token's "
                    "snapshot confidence, then remask the least confident tokens and rewrite them with "
                    "larger (by default global) blocks.")
    src = gen.add_argument_group("model")
    src.add_argument("--model", default="default",
                     help="'default' (the small model shipped inside the package, see its MODEL_CARD.md), a "
                          "checkpoint directory (did_engine or BD3-LM Hugging Face format), or 'preset:NAME' "
                          "for a randomly initialised preset (tiny, mini, small): useful for timing only")
    src.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    src.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                     help="model dtype (float32 on CPUs: bf16 matmuls are slow without bf16 instructions)")
    io = gen.add_argument_group("prompt and output")
    io.add_argument("--prompt", default=None,
                    help="prompt text (needs a tokenizer.json in the model directory)")
    io.add_argument("--prompt-ids", type=_parse_ids, default=None,
                    help="prompt as token ids, used as given, e.g. 50256,464")
    io.add_argument("--no-bos", action="store_true",
                    help="do not start samples (and --prompt) with the tokenizer's BOS token; by default they "
                         "do, as every training sequence does")
    io.add_argument("--length", type=positive_int, default=None, help="tokens per sample including the prompt "
                                                              "(default: the model's context length)")
    io.add_argument("--batch", type=positive_int, default=1, help="samples generated together")
    io.add_argument("--json", action="store_true", help="print one JSON object instead of text and a table")
    io.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_sampler_options(gen)
    samp = gen.add_argument_group("seed")
    samp.add_argument("--seed", type=int, default=0, help="seed of the torch.Generator driving every draw")

    sub.add_parser("info", help="print did_engine.build_info() as JSON")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def _load_model(spec: str, device: str, dtype):
    from did_engine.modeling.dit import PRESETS, BlockDiffusionLM

    if spec.startswith("preset:"):
        name = spec.split(":", 1)[1]
        if name not in PRESETS:
            raise CLIError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
        torch.manual_seed(0)
        return BlockDiffusionLM.from_preset(name, dropout=0.0).to(device=device, dtype=dtype).eval(), None
    from did_engine.modeling.checkpoint import _resolve_embedded
    from did_engine.pretrained import EMBEDDED_MODELS

    if not os.path.isdir(spec) and spec not in EMBEDDED_MODELS:
        raise CLIError(f"--model {spec!r} is not a directory, an embedded model ({', '.join(EMBEDDED_MODELS)}) "
                       "or 'preset:NAME'")
    spec = _resolve_embedded(spec)
    model = BlockDiffusionLM.from_pretrained(spec, device=device, dtype=dtype)
    tokenizer = None
    tok_path = os.path.join(spec, "tokenizer.json")
    if os.path.isfile(tok_path):
        from did_engine.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_file(tok_path)
    return model, tokenizer


def _rewritten_markup(tokens, draft, tokenizer, start):
    """The refined text with every rewritten token in [brackets]."""
    pieces = []
    for i in range(start, len(tokens)):
        piece = tokenizer.decode([tokens[i]]) if tokenizer else f" {tokens[i]}"
        pieces.append(f"[{piece}]" if tokens[i] != draft[i] else piece)
    return "".join(pieces)


def cmd_generate(args) -> int:
    from did_engine.sampling.sampler import generate

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available here")
    model, tokenizer = _load_model(args.model, args.device, DTYPES[args.dtype])
    prompt = None
    if args.prompt is not None and args.prompt_ids is not None:
        raise CLIError("give --prompt or --prompt-ids, not both")
    bos = start_ids(tokenizer, args.no_bos)
    if args.prompt is not None:
        if tokenizer is None:
            raise CLIError("--prompt needs a tokenizer.json in the model directory; use --prompt-ids")
        prompt = torch.tensor(bos + tokenizer.encode(args.prompt))
    elif args.prompt_ids is not None:
        prompt = torch.tensor(args.prompt_ids)
    elif bos:
        prompt = torch.tensor(bos)
    config = sampler_config_from_args(args)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    result = generate(model, args.batch, prompt=prompt, generator=generator, config=config,
                      progress=not (args.no_progress or args.json))
    decode = (lambda ids: tokenizer.decode(ids)) if tokenizer else None
    if args.json:
        out = {
            "tokens": result.tokens.tolist(), "draft_tokens": result.draft_tokens.tolist(),
            "confidence": [[None if c == float("inf") else c for c in row] for row in result.confidence.tolist()],
            "lengths": result.lengths.tolist(), "prompt_length": result.prompt_length,
            "remasked": {k: v.tolist() for k, v in result.remasked.items()},
            "nfe": result.nfe, "seconds": result.seconds, "tokens_per_second": result.tokens_per_second(),
            "settings": {**{k: v for k, v in vars(args).items() if k not in ("stages", "func", "run")},
                         "stages": [vars(s) for s in config.stages]},
        }
        if decode:
            out["text"] = [decode(r[: int(n)].tolist()) for r, n in zip(result.tokens, result.lengths)]
            out["draft_text"] = [decode(r[: int(n)].tolist()) for r, n in zip(result.draft_tokens, result.lengths)]
        print(json.dumps(out))
        return 0
    for b in range(result.tokens.shape[0]):
        n = int(result.lengths[b])
        tokens, draft = result.tokens[b, :n].tolist(), result.draft_tokens[b, :n].tolist()
        print(f"=== sample {b} ===")
        print("draft:   ", decode(draft) if decode else " ".join(map(str, draft)))
        if config.stages:
            print("refined: ", decode(tokens) if decode else " ".join(map(str, tokens)))
            changed = sum(t != d for t, d in zip(tokens, draft))
            print(f"rewritten ({changed} tokens in [brackets]):",
                  _rewritten_markup(tokens, draft, tokenizer, result.prompt_length))
    print()
    print(result.summary_table())
    print(f"{result.tokens_per_second():.1f} generated tokens/s, batch {result.tokens.shape[0]}, "
          f"{result.total_nfe} model calls")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            import did_engine

            print(json.dumps(did_engine.build_info(), indent=2))
            return 0
        if hasattr(args, "run"):
            return args.run(args)
        return cmd_generate(args)
    except UserError as exc:  # only the user's mistakes: a bug keeps its traceback
        print(f"did-engine: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
