"""Kernel microbenchmarks: did_engine ops beside their PyTorch baselines, in one table.

    python bench/bench_ops.py                 # full grid (a few minutes on 2 cores)
    python bench/bench_ops.py --quick         # a representative subset (~1 minute)
    python bench/bench_ops.py --save          # also write bench/results/ops_<device>_<date>.md

Every row times ours and the baseline in the same run, on the same inputs, and prints the
ratio (baseline time / our time: > 1 means we are faster). Decode attention also shows the
achieved bandwidth (bytes of K/V read / time) against this machine's read bandwidth,
measured at start-up, and the ratio to that memory floor.

Baselines:
  decode      SDPA (no mask) on the already concatenated [cache; block] K/V; the
              concatenation is NOT timed, which favours the baseline.
  block-causal SDPA with a dense bool block-causal mask; FlexAttention (torch.compile) with a
              block mask.
  remask      torch.topk over masked confidences + sort + two scatter_.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import did_engine
from did_engine import ops
from did_engine.ops.reference import block_causal_mask

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timeit(fn, min_time: float = 0.2, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_bandwidth(nbytes: int = 1 << 29) -> tuple[float, float]:
    """(read GB/s, copy GB/s counting read + write) of this machine, with torch's own kernels."""
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    copy_s = timeit(lambda: dst.copy_(src), min_reps=5)
    read_s = timeit(lambda: src.sum(), min_reps=5)
    return nbytes / read_s / 1e9, 2 * nbytes / copy_s / 1e9


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    ours_ms: float
    baselines: dict  # name -> ms (None when the baseline cannot run)
    extra: str = ""


def bench_decode(B, S, n, dtype, read_gbps, H=12, H_kv=12, D=64):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    q = rnd(B, n, H, D)
    k_cache, v_cache = rnd(B, S, H_kv, D), rnd(B, S, H_kv, D)
    k_block, v_block = rnd(B, n, H_kv, D), rnd(B, n, H_kv, D)
    lens = torch.full((B,), S - n, dtype=torch.int32)  # cache + block = S keys per row
    ours = timeit(lambda: ops.block_decode_attention(q, k_cache, v_cache, k_block, v_block, lens))
    # SDPA's layout is [B, H, seq, D]; the concatenation happens once, outside the timing.
    k_all = torch.cat([k_cache[:, : S - n], k_block], 1).transpose(1, 2).contiguous()
    v_all = torch.cat([v_cache[:, : S - n], v_block], 1).transpose(1, 2).contiguous()
    q_t = q.transpose(1, 2).contiguous()
    sdpa = timeit(lambda: F.scaled_dot_product_attention(q_t, k_all, v_all))
    kv_bytes = 2 * B * S * H_kv * D * q.element_size()
    floor_s = kv_bytes / (read_gbps * 1e9)
    gbps = kv_bytes / ours / 1e9
    return Row("decode", f"B={B} S={S} n={n}", str(dtype).split(".")[-1], ours * 1e3, {"sdpa": sdpa * 1e3},
               f"{gbps:.1f} GB/s, {ours / floor_s:.2f}x floor")


_flex_cache: dict = {}


def _flex_attention(q, k, v, block_size):
    """Compiled FlexAttention with a block-causal block mask (None if unavailable here)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    S = q.shape[2]
    key = (S, block_size, q.shape[0], q.dtype)
    if key not in _flex_cache:
        # One compiled graph per shape; the default recompile limit (8) would silently fall
        # back to the unfused implementation part-way through the grid.
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx // block_size <= q_idx // block_size
        block_mask = create_block_mask(mask_mod, None, None, S, S, device="cpu")
        _flex_cache[key] = (torch.compile(flex_attention, dynamic=False), block_mask)
    fn, block_mask = _flex_cache[key]
    return lambda: fn(q, k, v, block_mask=block_mask)


def bench_block_causal(B, S, block, dtype, flex: bool, H=12, D=64):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(dtype) for _ in range(3))
    ours = timeit(lambda: ops.block_causal_attention(q, k, v, block))
    q_t, k_t, v_t = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    mask = block_causal_mask(S, block)
    baselines = {"sdpa_mask": timeit(lambda: F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask)) * 1e3}
    baselines["flex"] = None
    if flex:
        try:
            fn = _flex_attention(q_t, k_t, v_t, block)
            baselines["flex"] = timeit(fn) * 1e3 if fn is not None else None
        except Exception as exc:  # noqa: BLE001 - report, do not abort the table
            print(f"  flex attention unavailable for {dtype}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
    return Row("block_causal", f"B={B} S={S} block={block}", str(dtype).split(".")[-1], ours * 1e3, baselines)


def bench_remask(B, S, k):
    g = torch.Generator().manual_seed(2)
    tokens0 = torch.randint(0, 50257, (B, S), generator=g)
    conf0 = torch.rand(B, S, generator=g)
    eligible = torch.ones(B, S, dtype=torch.bool)
    eligible[:, : S // 8] = False  # a prompt
    tokens, conf = tokens0.clone(), conf0.clone()
    mask_id = 50257

    def ours_call():
        tokens.copy_(tokens0)
        conf.copy_(conf0)
        ops.snapshot_remask(tokens, conf, k, eligible, mask_id)

    def torch_call():
        tokens.copy_(tokens0)
        conf.copy_(conf0)
        idx = torch.topk(conf.masked_fill(~eligible, float("inf")), k, dim=1, largest=False).indices
        idx = idx.sort(dim=1).values
        tokens.scatter_(1, idx, mask_id)
        conf.scatter_(1, idx, float("inf"))

    def reset_only():
        tokens.copy_(tokens0)
        conf.copy_(conf0)

    # Both calls restore the inputs first; subtract that shared cost.
    reset = timeit(reset_only, min_reps=20)
    ours = max(timeit(ours_call, min_reps=20) - reset, 1e-9)
    base = max(timeit(torch_call, min_reps=20) - reset, 1e-9)
    return Row("snapshot_remask", f"B={B} S={S} k={k}", "float32", ours * 1e3, {"topk+scatter": base * 1e3})


def format_table(rows: list[Row]) -> str:
    names = []
    for r in rows:
        for name in r.baselines:
            if name not in names:
                names.append(name)
    header = ["op", "shape", "dtype", "ours ms"] + [f"{n} ms" for n in names] + [f"x vs {n}" for n in names] + ["notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.op, r.shape, r.dtype, f"{r.ours_ms:.3f}"]
        cells += [f"{r.baselines[n]:.3f}" if r.baselines.get(n) is not None else "-" for n in names]
        cells += [f"{r.baselines[n] / r.ours_ms:.2f}" if r.baselines.get(n) is not None else "-" for n in names]
        cells.append(r.extra)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ours_vs_baseline_row(cells, ours_fn, base_fn, tokens: int, diff: float) -> str:
    """Time ours and the baseline (same run) -> a markdown row: the leading cells, ours ms,
    baseline ms, speed-up, our tokens/s (``tokens`` per call) and the max abs difference."""
    ours, base = timeit(ours_fn, min_reps=3), timeit(base_fn, min_reps=3)
    return (f"| {' | '.join(map(str, cells))} | {ours * 1e3:.1f} | {base * 1e3:.1f} | {base / ours:.2f}x | "
            f"{tokens / ours:.0f} | {diff:.1e} |")


def save_results(stem: str, title: str, script: str, argv, table: str, notes: str = "") -> str:
    """Write bench/results/<stem>_<date>.md: the title, the machine, the command line that
    made it, ``notes`` (markdown lines) and the table; returns the path."""
    args = " ".join(argv if argv is not None else sys.argv[1:])
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        f"{stem}_{datetime.date.today().isoformat()}.md")
    with open(path, "w") as f:
        f.write(f"# {title}\n\n" + machine_description() + f"- command: `python bench/{script} {args}`\n"
                + notes + "\n" + table.rstrip("\n") + "\n")
    print(f"saved {path}")
    return path


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = did_engine.build_info()
    return (
        f"- date: {datetime.date.today().isoformat()}\n"
        f"- machine: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}\n"
        f"- python {platform.python_version()}, torch {torch.__version__}, did_engine {info['version']} "
        f"(cpu_capability {info['cpu_capability']}, openmp {info['openmp']})\n"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a representative subset of the grid (about a minute)")
    parser.add_argument("--ops", default="decode,block_causal,remask",
                        help="comma-separated subset of: decode, block_causal, remask")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--no-flex", action="store_true", help="skip the compiled FlexAttention baseline (slow to compile)")
    parser.add_argument("--save", action="store_true", help="write the table to bench/results/ops_cpu_<date>.md")
    parser.add_argument("--out", default=None, help="write the table to this markdown file (implies --save)")
    args = parser.parse_args(argv)

    which = set(args.ops.split(","))
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    read_gbps, copy_gbps = measure_bandwidth()
    print(f"memory bandwidth: read {read_gbps:.1f} GB/s, copy (read+write) {copy_gbps:.1f} GB/s")

    if args.quick:
        decode_grid = [(1, 1024, 4), (8, 1024, 16), (64, 4096, 4)]
        causal_grid = [(1, 1024, 4), (8, 1024, 16)]
        remask_grid = [(64, 1024, 256), (1, 4096, 1024)]
    else:
        decode_grid = [(B, S, n) for B in (1, 8, 64) for S in (256, 1024, 4096) for n in (4, 16)]
        causal_grid = [(B, S, blk) for B in (1, 8, 64) for S in (256, 1024, 4096) for blk in (4, 16)
                       if B * S <= 8 * 4096]  # the dense-mask baseline is O(S^2) memory and time
        remask_grid = [(B, S, S // 4) for B in (1, 8, 64) for S in (256, 1024, 4096)]

    rows = []
    if "decode" in which:
        for dtype in dtypes:
            for B, S, n in decode_grid:
                rows.append(bench_decode(B, S, n, dtype, read_gbps))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    if "block_causal" in which:
        for dtype in dtypes:
            for B, S, blk in causal_grid:
                rows.append(bench_block_causal(B, S, blk, dtype, flex=not args.no_flex))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    if "remask" in which:
        for B, S, k in remask_grid:
            rows.append(bench_remask(B, S, k))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)

    table = format_table(rows)
    report = (
        "# did_engine CPU op benchmarks\n\n" + machine_description()
        + f"- memory bandwidth measured in the same run: read {read_gbps:.1f} GB/s, copy {copy_gbps:.1f} GB/s\n"
        + f"- command: `python bench/bench_ops.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        + "Ratios are baseline time / our time (> 1: did_engine is faster).\n\n" + table + "\n"
    )
    print()
    print(table)
    if args.save or args.out:
        path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"ops_cpu_{datetime.date.today().isoformat()}.md")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(report)
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
