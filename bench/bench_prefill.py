"""Prompt prefill into an empty KV cache: one block-causal forward vs one forward per block.

    python bench/bench_prefill.py                     # small preset, 512-token prompt, block 4, batch 1/8
    python bench/bench_prefill.py --preset mini --prompts 64,255 --batches 1
    python bench/bench_prefill.py --save              # write bench/results/prefill_cpu_<date>.md

Ours (``model.commit(prompt, cache, block_size=b)`` into an empty cache): one forward over
the whole prompt with ``ops.block_causal_attention`` (query block j sees key blocks 0..j),
each layer's K/V committed at once. Baseline, same weights, same run: what the sampler did
before, one forward per prompt block (``prefill_in_one_pass = False``); the two fill the
same cache up to float32 rounding (max abs difference of the cached keys is printed). A
block-by-block prefill reads every weight P / b times: at batch 1 that is most of its cost.
Random weights; float32.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import ours_vs_baseline_row, save_results  # noqa: E402

from did_engine.modeling import BlockDiffusionLM  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model preset (tiny, mini, small)")
    parser.add_argument("--prompts", default="512", help="comma-separated prompt lengths")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--block", type=int, default=4, help="block size of the prefill")
    parser.add_argument("--save", action="store_true", help="write bench/results/prefill_cpu_<date>.md")
    args = parser.parse_args(argv)
    prompts = [int(s) for s in args.prompts.split(",")]
    batches = [int(s) for s in args.batches.split(",")]
    torch.manual_seed(0)
    model = BlockDiffusionLM.from_preset(args.preset, model_length=max(max(prompts), args.block), dropout=0.0).eval()
    print(f"{args.preset}: {model.num_parameters() / 1e6:.1f}M parameters, float32, {torch.get_num_threads()} threads")

    def prefill(tokens, one_pass):
        model.prefill_in_one_pass = one_pass
        cache = model.new_kv_cache(tokens.shape[0], max_len=tokens.shape[1])
        model.commit(tokens, cache, block_size=args.block)
        return cache

    header = ("| batch | prompt | one forward ms | per-block forwards ms | speed-up | one forward tokens/s "
              "| max abs key diff |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    print(header)
    with torch.inference_mode():
        for B in batches:
            for P in prompts:
                tokens = torch.randint(0, model.config.vocab_size - 1, (B, P), generator=torch.Generator().manual_seed(P))
                diff = (prefill(tokens, True).k - prefill(tokens, False).k).abs().max().item()
                line = ours_vs_baseline_row((B, P), lambda: prefill(tokens, True), lambda: prefill(tokens, False),
                                            B * P, diff)
                lines.append(line)
                print(line, flush=True)
    del model.prefill_in_one_pass
    if args.save:
        save_results("prefill_cpu", f"Prompt prefill, {args.preset} preset, block {args.block}, float32",
                     "bench_prefill.py", argv, "\n".join(lines),
                     "\nSpeed-up = per-block time / one-forward time (same weights, same run).\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
