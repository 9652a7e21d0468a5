"""What the global refine stage's step count buys: Gen PPL and entropy against refine time,
all configurations refining the same drafts.

    python bench/bench_refine_steps.py                          # dit-mini, 32 samples, ~6 min
    python bench/bench_refine_steps.py --ratios 0.25 --steps 1,2,8 --samples 16
    python bench/bench_refine_steps.py --reuse-context          # also the approximate reused-context steps
    python bench/bench_refine_steps.py --save                   # bench/results/refine_steps_<model>_<date>.md

The drafts (block 4, first-hitting, nucleus 0.9, BOS first) are generated once; every
(ratio, steps) configuration then refines copies of them with ``DiDSampler.refine`` from
the same per-sample generator state, so the rows differ only by the refinement. Each row
reports the judge's Gen PPL (mean of per-sample PPL and token-weighted), unigram entropy,
the samples it improved over their draft, and the refine stage's wall time next to the
draft's. Under a compute-bound batch a global step costs about as much as L / 4 draft
calls, so the step count is the knob that sets refine / draft.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from did_engine.data.tokenizer import start_ids
from did_engine.evaluation import Judge, gen_ppl_summary, sample_seed, unigram_entropy
from did_engine.modeling.loading import load_for_sampling
from did_engine.parsing import parse_list
from did_engine.sampling import DiDSampler, RefineStage, SamplerConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import save_results  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit-mini",
                        help="checkpoint directory or embedded model name (default: dit-mini, the recorded results' model)")
    parser.add_argument("--judge", default="smollm2-135m", help="judge spec, as for did-engine eval")
    parser.add_argument("--samples", type=int, default=32, help="drafts (one batch)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; sample i draws from seed * 1e6 + i")
    parser.add_argument("--length", type=int, default=None, help="tokens per sample (default: the model's context)")
    parser.add_argument("--ratios", type=lambda text: parse_list(text, float, "--ratios"), default=[0.1, 0.25], help="remask ratios, comma-separated")
    parser.add_argument("--steps", type=lambda text: parse_list(text, int, "--steps"), default=[1, 2, 4, 8, 16], help="global refine step counts")
    parser.add_argument("--reuse-context", action="store_true",
                        help="also run every multi-step configuration with reuse_context=True (approximate: "
                             "one full forward, then only the remasked positions re-run)")
    parser.add_argument("--save", action="store_true", help="write the table to bench/results/")
    args = parser.parse_args(argv)

    model, tokenizer = load_for_sampling(args.model, "cpu", torch.float32)
    if tokenizer is None:
        parser.error(f"{args.model} has no tokenizer.json beside its weights: the judge needs text")
    judge = Judge.load(args.judge)
    length = args.length or model.config.model_length
    sampler = DiDSampler(model, SamplerConfig(length=length, stages=[]))
    prompt = start_ids(tokenizer, no_bos=False) or None

    def generators():
        return [torch.Generator().manual_seed(sample_seed(args.seed, i)) for i in range(args.samples)]

    gens = generators()
    draft = sampler.generate(args.samples, prompt=prompt, generator=gens)
    draft_s = draft.seconds["draft"]
    state = [g.get_state() for g in gens]  # every configuration continues from here

    def judged(result):
        texts = [tokenizer.decode(row[: int(n)].tolist()) for row, n in zip(result.tokens, result.lengths)]
        scores = judge.score(texts)
        ent = sum(unigram_entropy(row[: int(n)]) for row, n in zip(result.tokens, result.lengths)) / len(texts)
        return scores, gen_ppl_summary(scores), ent

    base_scores, base, base_ent = judged(draft)
    print(f"draft: {args.samples} samples x {length} tokens in {draft_s:.1f} s; Gen PPL {base['mean_per_sample']:.1f}",
          flush=True)
    rows = [("draft only", "-", "-", base, base_ent, 0.0, None, None)]
    for ratio in args.ratios:
        for steps in args.steps:
            for reuse in (False, True) if args.reuse_context and steps > 1 else (False,):
                gens = [torch.Generator() for _ in state]
                for g, st in zip(gens, state):
                    g.set_state(st)
                t0 = time.perf_counter()
                refined = sampler.refine(draft, [RefineStage(None, ratio, steps, reuse_context=reuse)], generator=gens)
                seconds = time.perf_counter() - t0
                scores, summary, ent = judged(refined)
                wins = sum(s.ppl < b.ppl for s, b in zip(scores, base_scores))
                mode = "reused" if reuse else "exact"
                rows.append((f"{ratio:g}", str(steps), mode, summary, ent, seconds, seconds / draft_s, wins))
                print(f"ratio {ratio:g} steps {steps} {mode}: Gen PPL {summary['mean_per_sample']:.1f}, "
                      f"refine {seconds:.1f} s", flush=True)

    lines = ["| remask ratio | global steps | context | Gen PPL (mean) | Gen PPL (token) | entropy | refine s "
             "| refine / draft | samples improved |", "|---|---|---|---|---|---|---|---|---|"]
    for ratio, steps, mode, summary, ent, seconds, rel, wins in rows:
        lines.append(f"| {ratio} | {steps} | {mode} | {summary['mean_per_sample']:.1f} | {summary['token_weighted']:.1f} | "
                     f"{ent:.3f} | {seconds:.2f} | " + ("-" if rel is None else f"{rel:.2f}") + " | "
                     + ("-" if wins is None else f"{wins}/{args.samples}") + " |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.save:
        name = os.path.basename(os.path.normpath(args.model))
        save_results(f"refine_steps_{name}", f"Refine step count: quality against time ({args.model} model)",
                     "bench_refine_steps.py", argv, table,
                     f"- {args.samples} samples (seed {args.seed}), length {length}, one batch; drafts: block 4, "
                     f"first-hitting, nucleus 0.9, BOS first, {draft_s:.1f} s; judge {args.judge}; snapshot "
                     "remasking, global refine, confidence order; every row refines the same drafts from the "
                     "same generator state\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
