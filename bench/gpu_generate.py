"""One decode step (eager, and replayed from a CUDA graph) and whole DiD generations.

    python bench/gpu_generate.py --out results.md                     # small preset, bf16, CUDA
    python bench/gpu_generate.py --device cpu --preset tiny --length 32 --batches 1,2

Random weights (the speed of a forward does not depend on them). Decode step: one 4-token
block against a cache holding L - 8 tokens, the call a first-hitting draft makes L times
per sample. It is timed eagerly and replayed from a CUDA graph; the graph's logits must
equal the eager ones bit for bit (the same kernels on the same inputs), else the row says
so and the script exits 1. Generation: DiDSampler, first-hitting draft with block 4 and
one global refine stage (25% remasked, 8 steps), wall time with the device synchronised.
The sampler has no CUDA-graph path, so whole generations run eagerly only. The graph
captures run last: a capture that fails (a host synchronisation inside decode) is reported
in the table, and cannot disturb the other measurements.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_and_open(parser, argv, script: str):
    """Add the options every gpu_*.py script has (--device, --preset, --out), parse, and
    return (args, torch.device), the device None (with a line on stderr) when it is CUDA
    and there is none."""
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    parser.add_argument("--preset", default="small", help="model preset (random weights)")
    parser.add_argument("--out", default=None, help="markdown file for the tables")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{script}: no CUDA device", file=sys.stderr)
        return args, None
    return args, device


def finish(args, script: str, lines: list, ok: bool, t_start: float) -> int:
    """Write the tables to --out, say how it went; the exit status."""
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    print(f"{script}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - t_start:.1f} s", flush=True)
    return 0 if ok else 1


def median_seconds(fn, device, reps: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_inputs(model, B: int, L: int, device):
    """A cache holding L - 8 random keys per row and one 4-token block."""
    bs = 4
    cache = model.new_kv_cache(B, max_len=L - bs)
    cache.k.normal_()
    cache.v.normal_()
    cache.set_lengths(L - 2 * bs)
    return torch.randint(0, model.mask_id, (B, bs), device=device), cache


def graph_replay(model, block, cache, device, reps: int) -> tuple:
    """(replay ms or None, what the check found) for one decode call captured as a CUDA graph."""
    eager = model.decode(block, cache)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model.decode(block, cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model.decode(block, cache)
    except Exception as exc:  # noqa: BLE001 - reported: a host sync or an uncapturable op in decode
        return None, f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    graph.replay()
    sync(device)
    ms = median_seconds(graph.replay, device, reps) * 1e3
    if torch.equal(captured, eager):
        return ms, "replay == eager"
    return ms, f"replay differs from eager (max |diff| {(captured.float() - eager.float()).abs().max().item():.3g})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=None, help="tokens per sample (default: the preset's context)")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) or float32 (default on CPU)")
    parser.add_argument("--reps", type=int, default=20, help="timed decode calls")
    parser.add_argument("--budget", type=float, default=150.0,
                        help="seconds: generations that would start after this are skipped (and listed)")
    t_start = time.perf_counter()
    args, device = parse_and_open(parser, argv, "gpu_generate")
    if device is None:
        return 2
    from did_engine.modeling import BlockDiffusionLM
    from did_engine.sampling import generate

    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    model = BlockDiffusionLM.from_preset(args.preset, dropout=0.0).to(device=device, dtype=dtype).eval()
    L = args.length or model.config.model_length
    batches = [int(b) for b in args.batches.split(",")]
    lines = [f"Preset {args.preset} ({model.num_parameters() / 1e6:.1f}M parameters, random weights), {dtype}, "
             f"L = {L}, {device}.", "", "Decode step (4-token block against L - 8 cached tokens):", "",
             "| batch | eager ms | CUDA graph ms | graph check |", "|---|---|---|---|"]
    ok = True
    eager_ms = {}
    with torch.no_grad():
        for B in batches:
            block, cache = decode_inputs(model, B, L, device)
            eager_ms[B] = median_seconds(lambda: model.decode(block, cache), device, args.reps) * 1e3
            print(f"decode step, batch {B}: {eager_ms[B]:.3f} ms eager", flush=True)
    generation_lines = ["", "Whole DiD generation (first-hitting draft, block 4; global refine 25% x 8 steps; eager: "
              "the sampler has no CUDA-graph path):", "",
              "| batch | seconds | tokens/s | NFE (decode+commit+refine) | draft s | refine s |", "|---|---|---|---|---|---|"]
    lines_before, lines = lines, generation_lines
    for B in batches:
        if time.perf_counter() - t_start > args.budget:
            lines.append(f"| {B} | skipped: past the {args.budget:.0f} s budget | | | | |")
            print(lines[-1], flush=True)
            continue
        gen = torch.Generator(device=device).manual_seed(B)
        sync(device)
        t0 = time.perf_counter()
        result = generate(model, B, length=L, block_size=4, stages=[(None, 0.25, 8)], top_p=0.9, generator=gen)
        sync(device)
        seconds = time.perf_counter() - t0
        masked_left = int((result.tokens == model.mask_id).sum())
        ok &= masked_left == 0
        refine = sum(v for k, v in result.seconds.items() if k.startswith("refine"))
        lines.append(f"| {B} | {seconds:.2f} | {B * L / seconds:.0f} | {result.total_nfe} | "
                     f"{result.seconds['draft']:.2f} | {refine:.2f} |"
                     + (f" {masked_left} MASK TOKENS LEFT |" if masked_left else ""))
        print(lines[-1], flush=True)

    # Captures last: a failed capture can leave the device unusable for what follows.
    decode_rows = []
    with torch.no_grad():
        for B in batches:
            graph_ms, check = "-", "not on CPU"
            if device.type == "cuda":
                block, cache = decode_inputs(model, B, L, device)
                ms, check = graph_replay(model, block, cache, device, args.reps)
                graph_ms = "-" if ms is None else f"{ms:.3f}"
                ok &= not check.startswith("replay differs")
            decode_rows.append(f"| {B} | {eager_ms[B]:.3f} | {graph_ms} | {check} |")
            print(decode_rows[-1], flush=True)
    lines = lines_before + decode_rows + lines
    return finish(args, "gpu_generate", lines, ok, t_start)


if __name__ == "__main__":
    sys.exit(main())
