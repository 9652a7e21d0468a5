"""`did-engine generate`: draft-then-refine generation from the embedded model, a checkpoint
or a preset, as text with a table of model calls, or as one JSON object."""

from __future__ import annotations

import json

import torch

from did_engine.cli.options import (CLIError, HelpFormatter, add_device_options, add_sampler_options, argument_type,
                                    check_device, group, sampler_config_from_args)
from did_engine.data.tokenizer import start_ids
from did_engine.modeling.loading import load_for_sampling, resolve_dtype
from did_engine.parsing import positive_int, token_ids
from did_engine.sampling import sampler


def add_parser(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate", formatter_class=HelpFormatter,
        help="generate text: block-diffusion draft, then refinement stages",
        description="Draft the sequence with small blocks and an exact KV cache, recording each token's "
                    "snapshot confidence, then remask the least confident tokens and rewrite them with "
                    "larger (by default global) blocks.")
    src = group(gen, "model")
    src.add_argument("--model", default="default",
                     help="'default' (the small model shipped inside the package, see its MODEL_CARD.md); a "
                          "checkpoint directory: did_engine's, BD3-LM's, or a Hugging Face directory of SDAR / "
                          "TraDo (sdar), Fast-dLLM v2 (Fast_dLLM_Qwen) or a llama / qwen2 / qwen3 causal LM "
                          "(adapted: a new mask token, logit shift); a .gguf file; 'smollm2-135m'; a Hugging Face "
                          "hub name (org/name); or 'preset:NAME' for a randomly initialised DiT preset (tiny, "
                          "mini, small): useful for timing only. Text goes through the tokenizer.json that "
                          "comes with the model")
    add_device_options(src)
    io = group(gen, "prompt and output")
    io.add_argument("--prompt", default=None,
                    help="prompt text (needs the model's tokenizer: a tokenizer.json beside it)")
    io.add_argument("--prompt-ids", type=argument_type(token_ids), default=None,
                    help="prompt as token ids, used as given, e.g. 50256,464")
    io.add_argument("--no-bos", action="store_true",
                    help="do not start samples (and --prompt) with the tokenizer's BOS token; by default they "
                         "do, as every training sequence does")
    io.add_argument("--length", type=argument_type(positive_int), default=None,
                    help="tokens per sample including the prompt (default: the model's context length)")
    io.add_argument("--batch", type=argument_type(positive_int), default=1, help="samples generated together")
    io.add_argument("--json", action="store_true", help="print one JSON object instead of text and a table")
    io.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_sampler_options(gen)
    group(gen, "seed").add_argument("--seed", type=int, default=0,
                                    help="seed of the torch.Generator driving every draw")
    gen.set_defaults(run=cmd_generate)


def _rewritten_markup(tokens, draft, tokenizer, start):
    """The refined text with every rewritten token in [brackets]."""
    pieces = []
    for i in range(start, len(tokens)):
        piece = tokenizer.decode([tokens[i]]) if tokenizer else f" {tokens[i]}"
        pieces.append(f"[{piece}]" if tokens[i] != draft[i] else piece)
    return "".join(pieces)


def cmd_generate(args) -> int:
    check_device(args.device)
    model, tokenizer = load_for_sampling(args.model, args.device, resolve_dtype(args.dtype, args.device))
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
    result = sampler.generate(model, args.batch, prompt=prompt, generator=generator, config=config,
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
