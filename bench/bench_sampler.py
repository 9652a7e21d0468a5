"""End-to-end sampler throughput: draft (block 4, first-hitting) + one global refine stage.

    python bench/bench_sampler.py                          # small preset, L=1024, batch 1/8/64 (~10 min)
    python bench/bench_sampler.py --preset tiny --length 128 --mode full
    python bench/bench_sampler.py --save                   # write bench/results/sampler_cpu_<date>.md

Compared, with the same random weights and the same token-drawing code:
  ours       DiDSampler: KV-cached draft (each block's commit folded into the next block's
             first decode call; also timed with a separate commit forward per block)
             + remask + global refine
  no cache   the same draft without a cache: every step runs the block-causal forward over
             the whole prefix (batch 1 only: it is compute-bound, slower at every batch)
  BD3-LM     BD3-LM's compute pattern (batch 1 only, all its sampler allows): every step
             re-applies rotary to the whole window's cached q/k/v and runs full-window
             attention, keeping the last block; one such call per token plus one per block
             to store the clean block

--mode estimate (default; a batch-64 run at L=1024 takes far too long on a CPU to run whole)
times one draft block (its decode calls, its token draws and its commit) at five cache
positions across the sequence and integrates over all blocks, and times the refine stage's
remask plus one global forward, multiplied by the stage's step count. --mode full runs
whole generations (ours) and checks the estimate on small settings.

The weight-read floor of batch 1: each decode step reads every weight once, so a
first-hitting draft cannot beat (read bandwidth / weight bytes) tokens/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model_decode import BD3LMStyleCache, bd3lm_style_decode  # noqa: E402
from bench_ops import measure_bandwidth, save_results  # noqa: E402

from did_engine.modeling import BlockDiffusionLM  # noqa: E402
from did_engine.sampling import DiDSampler, RefineStage, SamplerConfig  # noqa: E402
from did_engine.sampling.drawing import TokenDrawer  # noqa: E402
from did_engine.sampling.sampler import _CachedBlocks  # noqa: E402


def once(fn, reps: int = 2) -> float:
    """Median seconds of `reps` calls after one warm-up call; a call that takes more than
    20 s is its own measurement (start-up costs are lost in it)."""
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 > 20.0:
        return time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def integrate(costs: dict, n_blocks: int, bs: int) -> float:
    """Sum of per-block costs measured at some cache positions, linearly interpolated."""
    points = sorted(costs)
    total = 0.0
    for j in range(n_blocks):
        p = j * bs
        hi = next((q for q in points if q >= p), points[-1])
        lo = max((q for q in points if q <= p), default=points[0])
        w = 0.0 if hi == lo else (p - lo) / (hi - lo)
        total += (1 - w) * costs[lo] + w * costs[hi]
    return total


class Bench:
    def __init__(self, model, length, bs, ratio, steps, top_p=0.9):
        self.model, self.L, self.bs, self.ratio, self.steps = model, length, bs, ratio, steps
        self.mask_id = model.mask_id
        self.positions = sorted({min(p, length - bs) // bs * bs for p in
                                 (0, length // 4, length // 2, 3 * length // 4, length - bs)})
        self.sampler = DiDSampler(model, SamplerConfig(length=length, block_size=bs, stages=[(None, ratio, steps)]))
        self.top_p = top_p

    def _draft_block(self, B, logits_fn, after=None, before=None):
        """Time to fill one all-mask block with first-hitting draws (after `before`, e.g. the
        previous block's commit; then `after`)."""
        gen = torch.Generator().manual_seed(0)
        drawer = TokenDrawer(self.mask_id, 1.0, self.top_p, gen)

        def run():
            if before is not None:
                before()
            x = torch.full((B, self.bs), self.mask_id, dtype=torch.int64)
            conf = torch.full((B, self.bs), float("inf"))
            self.sampler._fill(x, conf, x == self.mask_id, logits_fn, drawer, {"n": 0}, "n", order="random",
                               steps=None, gens=gen)
            if after is not None:
                after(x)
        return run

    def ours_draft(self, B, fused: bool = True) -> float:
        """The sampler's cached draft. fused: each block's commit rides on the next block's
        first decode call (the sampler's default for did_engine models); otherwise every
        block is committed by a forward of its own."""
        costs = {}
        for P in self.positions:
            blocks = _CachedBlocks(self.model, B, max(self.L - self.bs, self.bs), {})
            blocks.fused = fused
            clean = torch.randint(0, self.mask_id, (B, self.bs))

            def start(blocks=blocks, P=P):
                # The block before this one is finished: it is pending (fused) or committed now.
                blocks.cache.set_lengths(max(P - self.bs, 0))  # K/V contents do not change the cost
                blocks.pending = None
                if P:
                    blocks.commit(clean)
            costs[P] = once(self._draft_block(B, blocks.decode, before=start))
        return integrate(costs, -(-self.L // self.bs), self.bs)

    def uncached_draft(self) -> float:
        costs = {}
        for P in self.positions:
            prefix = torch.randint(0, self.mask_id, (1, P))

            def decode(xb, prefix=prefix, logit_positions=None):
                # Logits of the active block only, as the cached sampler computes them.
                need = torch.cat([torch.zeros_like(prefix, dtype=torch.bool), logit_positions], 1)
                return self.model(torch.cat([prefix, xb], 1), block_size=self.bs, logit_positions=need)
            costs[P] = once(self._draft_block(1, decode), reps=1)
        return integrate(costs, -(-self.L // self.bs), self.bs)

    def bd3lm_draft(self) -> float:
        costs = {}
        for P in self.positions:
            window = BD3LMStyleCache(self.model, torch.randint(0, self.mask_id, (1, P))) if P else None

            def decode(xb, window=window, logit_positions=None):
                # BD3-LM computes the whole block's logits; the sampler then reads the masked rows.
                logits = self.model(xb) if window is None else bd3lm_style_decode(self.model, xb, window)
                return logits if logit_positions is None else logits[logit_positions]
            # BD3-LM stores a finished block with one more full-window call.
            costs[P] = once(self._draft_block(1, decode, after=decode), reps=1)
        return integrate(costs, -(-self.L // self.bs), self.bs)

    def refine(self, B, full_steps: bool, reuse_context: bool = False) -> float:
        """The global refine stage: remask (op) + `steps` global forwards with their draws
        (reuse_context: one full forward, then partial ones; always run whole)."""
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, self.mask_id, (B, self.L))
        conf = torch.rand(B, self.L)
        full_steps = full_steps or reuse_context
        stage = RefineStage(None, self.ratio, self.steps if full_steps else 1, reuse_context=reuse_context)
        drawer = TokenDrawer(self.mask_id, 1.0, self.top_p, gen)
        lengths = torch.full((B,), self.L)

        def run():
            t, c = tokens.clone(), conf.clone()
            self.sampler._remask(t, c, 0, lengths, stage, gen, {})
            self.sampler._refine(t, c, 0, stage, drawer, gen, {"forward": 0}, False)
        seconds = once(run, reps=1)
        return seconds if full_steps else seconds * self.steps


def weight_bytes(model) -> int:
    """Bytes of the weights a forward reads in full: all but the input embedding, of which it
    gathers only the rows of its tokens."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "vocab_embed" not in name)


def forward_floor_seconds(model, bs: int) -> float:
    """One bs-token decode call at batch 1 over an empty cache, with logits at one position
    (as a first-hitting step computes them): the least a first-hitting step costs, since
    every step runs one and each must read every weight. Median of 9 after a warm-up."""
    cache = model.new_kv_cache(1, max_len=bs)
    x = torch.randint(0, model.mask_id, (1, bs))
    one = torch.zeros(1, bs, dtype=torch.bool)
    one[0, 0] = True
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        model.decode(x, cache, logit_positions=one)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[4]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model preset (random weights)")
    parser.add_argument("--length", type=int, default=1024, help="tokens per sample")
    parser.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    parser.add_argument("--block-size", type=int, default=4, help="draft block size")
    parser.add_argument("--ratio", type=float, default=0.25, help="remask ratio of the global refine stage")
    parser.add_argument("--steps", type=int, default=8, help="model calls of the global refine stage")
    parser.add_argument("--mode", choices=["estimate", "full"], default="estimate",
                        help="estimate: time blocks at 5 cache positions and integrate; full: whole generations")
    parser.add_argument("--no-baselines", action="store_true", help="skip the batch-1 baselines")
    parser.add_argument("--reuse-context", action="store_true",
                        help="also time the refine stage with reuse_context=True (approximate refinement)")
    parser.add_argument("--save", action="store_true", help="write bench/results/sampler_cpu_<date>.md")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = BlockDiffusionLM.from_preset(args.preset, model_length=args.length, block_size=args.block_size,
                                         dropout=0.0).eval()
    read_gbps, _ = measure_bandwidth()
    with torch.inference_mode():
        floor_s = forward_floor_seconds(model, args.block_size)
    floor_tps = 1.0 / floor_s
    print(f"{args.preset}: {model.num_parameters() / 1e6:.1f}M parameters; a forward reads {weight_bytes(model) / 1e6:.0f} MB "
          f"of fp32 weights (>= {weight_bytes(model) / read_gbps / 1e6:.1f} ms at the measured {read_gbps:.1f} GB/s); "
          f"one {args.block_size}-token forward at batch 1 takes {floor_s * 1e3:.1f} ms -> weight-read floor "
          f"{floor_tps:.2f} tokens/s for a one-token-per-step draft", flush=True)
    bench = Bench(model, args.length, args.block_size, args.ratio, args.steps)
    batches = [int(b) for b in args.batches.split(",")]

    rows = []
    baseline = {}
    with torch.inference_mode():
        if not args.no_baselines:
            baseline["no cache"] = args.length / bench.uncached_draft()
            print(f"no-cache draft, batch 1: {baseline['no cache']:.2f} tokens/s", flush=True)
            baseline["BD3-LM"] = args.length / bench.bd3lm_draft()
            print(f"BD3-LM pattern, batch 1: {baseline['BD3-LM']:.2f} tokens/s", flush=True)
        for B in batches:
            if args.mode == "full":
                sampler = DiDSampler(model, SamplerConfig(length=args.length, block_size=args.block_size,
                                                          stages=[(None, args.ratio, args.steps)]))
                result = sampler.generate(B, generator=torch.Generator().manual_seed(0))
                draft_s, refine_s = result.seconds["draft"], result.seconds["refine_1"]
                split_s = None
            else:
                draft_s = bench.ours_draft(B)
                split_s = bench.ours_draft(B, fused=False)
                print(f"batch {B}: draft {draft_s:.1f} s (separate commit forwards: {split_s:.1f} s)", flush=True)
                refine_s = bench.refine(B, full_steps=B * args.length <= 8192)
            reuse_s = bench.refine(B, full_steps=True, reuse_context=True) if args.reuse_context else None
            if reuse_s is not None:
                print(f"batch {B}: refine with reused context {reuse_s:.1f} s", flush=True)
            tps = B * args.length / (draft_s + refine_s)
            rows.append((B, draft_s, split_s, refine_s, tps, reuse_s))
            print(f"batch {B}: draft {draft_s:.1f} s, refine {refine_s:.1f} s, {tps:.1f} tokens/s", flush=True)

    bd3 = baseline.get("BD3-LM")
    reuse_cols = args.reuse_context
    lines = ["| batch | draft s | draft s, separate commits | refine s | refine / draft | ours tokens/s "
             "| vs no cache (b=1) | vs BD3-LM (b=1) | draft-only tokens/s vs floor |"
             + (" reused-context refine s | its refine / draft | its tokens/s |" if reuse_cols else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if reuse_cols else "")]
    for B, d, split, r, tps, reuse in rows:
        draft_tps = B * args.length / d
        reuse_cells = (f" {reuse:.1f} | {reuse / d:.2f} | {B * args.length / (d + reuse):.2f} |"
                       if reuse is not None else "")
        lines.append(f"| {B} | {d:.1f} | " + (f"{split:.1f} ({split / d:.2f}x)" if split else "-")
                     + f" | {r:.1f} | {r / d:.2f} | {tps:.2f} | "
                     + (f"{tps / baseline['no cache']:.1f}x" if baseline else "-") + " | "
                     + (f"{tps / bd3:.1f}x" if bd3 else "-") + " | "
                     + (f"{draft_tps:.2f} = floor / {floor_tps / draft_tps:.2f}" if B == 1 else "-") + " |"
                     + reuse_cells)
    table = "\n".join(lines)
    print()
    if baseline:
        print("batch-1 baselines (draft only, tokens/s): " + ", ".join(f"{k} {v:.2f}" for k, v in baseline.items()))
    print(table)
    if args.save:
        save_results("sampler_cpu", f"Sampler throughput, {args.preset} preset (random weights), L={args.length}, "
                     f"draft block {args.block_size} first-hitting + global refine ratio {args.ratio}, {args.steps} "
                     f"steps, mode {args.mode}", "bench_sampler.py", argv, table,
                     f"- weight-read floor at batch 1: one {args.block_size}-token forward (empty cache) takes "
                     f"{floor_s * 1e3:.1f} ms -> {floor_tps:.2f} tokens/s at one token per step; it reads "
                     f"{weight_bytes(model) / 1e6:.0f} MB of weights (measured read bandwidth {read_gbps:.1f} GB/s)\n"
                     + "- batch-1 baselines (draft only, tokens/s): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in baseline.items()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
