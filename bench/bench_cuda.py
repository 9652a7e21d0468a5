"""CUDA microbenchmarks of the did_engine kernels against PyTorch and xformers baselines.

    python bench/bench_cuda.py                 # everything, table saved under bench/results/
    python bench/bench_cuda.py --only decode --iters 50 --out my_table.md
    python bench/bench_cuda.py --quick --out bench/results/ops.md   # a few shapes (GPU check)

What is measured (bf16 unless noted; times are medians of CUDA-event timings, with the L2
cache flushed before every timed call unless --warm-l2):

* decode attention: ``block_decode_attention`` (a block of n queries against a full KV
  cache plus the block's own keys, no mask) against SDPA on the same keys laid out as one
  contiguous [B, H, L, D] tensor (flash, efficient and cuDNN backends, each where it
  applies), compiled FlexAttention, and xformers' split-K decoding kernel
  (``memory_efficient_attention_forward`` with ``triton_splitk.FwOp`` and a
  ``BlockDiagonalPaddedKeysMask``: each row's keys in a padded [S] slot, the block already
  appended). The baselines get their keys pre-arranged: that copy is not timed.
  B in {1, 8, 64}, S in {1024, 4096} keys per row (cache_lens = S - n), H = 12, D = 64,
  n in {4, 16}.
* snapshot remask: ``snapshot_remask`` against ``torch.topk`` + ``scatter_`` (+ the sort
  that makes the indices ascending), B = 64, S = 1024, k = 256. Both write into their
  inputs, so the inputs are restored from pristine copies before every call, outside the
  timed region.
* block-causal attention: ``block_causal_attention`` against SDPA with a dense boolean
  mask, compiled FlexAttention with a block mask, and xformers with block-diagonal masks:
  ``BlockDiagonalGappyKeysMask`` expresses block-causal exactly (each query block is a
  sequence whose keys are the prefix of its row up to the block's end), and
  ``BlockDiagonalCausalMask`` (token-causal, one sequence per row) is given as the speed
  of plain causal prefill, a different mask.

xformers is optional (``pip install -e ".[gpu-bench]"``); without it its rows are skipped
with one printed line. Every baseline row notes its max abs difference from did_engine's
output where the two compute the same thing.

Bandwidth is the logical minimum traffic (every input read once, every output written
once) over the time, and is also given as a % of this device's copy bandwidth, measured
here with a large tensor copy (bytes read + written). Attention rows also give TFLOP/s.
The table records the device, driver, torch and CUDA versions and the date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = ("decode", "remask", "causal")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="CUDA microbenchmarks of did_engine's kernels against SDPA, FlexAttention, xformers and "
        "torch.topk.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--only", choices=BENCHMARKS, action="append",
                        help="run only these benchmarks (repeatable); default: all")
    parser.add_argument("--quick", action="store_true",
                        help="a few shapes only (decode B in {1, 64} at S=4096, n=16; block-causal S=4096, "
                        "bs in {4, 64}): minutes, not tens of minutes")
    parser.add_argument("--iters", type=int, default=30, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    parser.add_argument("--warm-l2", action="store_true", help="do not flush the L2 cache before each timed call")
    parser.add_argument("--no-flex", action="store_true", help="skip the compiled FlexAttention baselines")
    parser.add_argument("--no-xformers", action="store_true", help="skip the xformers baselines")
    parser.add_argument("--out", default=None,
                        help="markdown file to write (default: bench/results/cuda_<device>_<date>.md)")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    return args


def decode_shapes(quick: bool):
    """(B, S, n) of the decode benchmark."""
    if quick:
        return [(1, 4096, 16), (64, 4096, 16)]
    return [(B, S, n) for B in (1, 8, 64) for S in (1024, 4096) for n in (4, 16)]


def causal_shapes(quick: bool):
    """(S, block_size) of the block-causal benchmark."""
    if quick:
        return [(4096, 4), (4096, 64)]
    return [(S, bs) for S in (1024, 4096) for bs in (4, 64, 256)]


def load_xformers(skip: bool):
    """xformers.ops, or None after printing one line saying why it is not used."""
    if skip:
        print("xformers baselines: skipped (--no-xformers)", flush=True)
        return None
    try:
        import xformers.ops as xops
    except ImportError as exc:
        print(f"xformers baselines: skipped, xformers is not installed ({exc}); "
              'pip install -e ".[gpu-bench]" adds it', flush=True)
        return None
    return xops


def compile_flex(torch):
    """flex_attention compiled once per shape set, with an error (not a silent eager
    fallback that would be timed as "compiled") when the recompile limit is reached."""
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 64)  # one compile per benchmarked shape
    config.fail_on_recompile_limit_hit = True
    return torch.compile(flex_attention, dynamic=False)


# ---------------------------------------------------------------------------------------
# Timing


class Timer:
    def __init__(self, torch, iters: int, warmup: int, flush_l2: bool):
        self.torch = torch
        self.iters = iters
        self.warmup = warmup
        # Larger than any L2 (H100: 50 MB): zeroing it evicts the previous call's data.
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda") if flush_l2 else None

    def __call__(self, fn, setup=None) -> float:
        """Median seconds of one call of fn (GPU time between CUDA events). setup(), when
        given, runs before every call (warm-up and timed) outside the timed region: it
        restores inputs that fn writes into."""
        torch = self.torch
        for _ in range(self.warmup):
            if setup is not None:
                setup()
            fn()
        torch.cuda.synchronize()
        events = []
        for _ in range(self.iters):
            if setup is not None:
                setup()
            if self.flush is not None:
                self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events) * 1e-3


def copy_bandwidth(torch, timer: Timer) -> float:
    """Device copy bandwidth in bytes/s (read + write) of a 1 GiB tensor copy."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    seconds = Timer(torch, max(10, timer.iters), 3, flush_l2=False)(lambda: dst.copy_(src))
    return 2 * 2**30 / seconds


def try_time(timer: Timer, fn, ours=None):
    """(seconds, note): note is the max abs difference from `ours` (when given), or
    (None, reason) when the baseline cannot run this shape."""
    try:
        out = fn()  # also surfaces "no kernel for this shape" before timing
        note = "" if ours is None else f"max abs diff vs did_engine {(out.float() - ours.float()).abs().max().item():.2e}"
        return timer(fn), note
    except Exception as exc:  # noqa: BLE001 - baselines refuse shapes in many ways
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"


def row(name, shape, impl, seconds, bytes_moved, flops, note=""):
    return dict(name=name, shape=shape, impl=impl, seconds=seconds, bytes=bytes_moved, flops=flops, note=note)


# ---------------------------------------------------------------------------------------
# Benchmarks: each returns rows {name, shape, impl, seconds, bytes, flops, note}


def bench_decode_shape(torch, timer: Timer, flex, xops, B: int, S: int, n: int):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from did_engine import ops

    H, D, dtype = 12, 64, torch.bfloat16
    cache_len = S - n
    q = torch.randn(B, n, H, D, device="cuda", dtype=dtype)
    k_cache = torch.randn(B, S, H, D, device="cuda", dtype=dtype)
    v_cache = torch.randn(B, S, H, D, device="cuda", dtype=dtype)
    k_block = torch.randn(B, n, H, D, device="cuda", dtype=dtype)
    v_block = torch.randn(B, n, H, D, device="cuda", dtype=dtype)
    lens = torch.full((B,), cache_len, dtype=torch.int32, device="cuda")
    # [B, S, H, D]: each row's cache_len cached keys followed by the block's n keys.
    k_rows = torch.cat([k_cache[:, :cache_len], k_block], dim=1)
    v_rows = torch.cat([v_cache[:, :cache_len], v_block], dim=1)
    # SDPA / Flex layout: [B, H, L, D] contiguous with L = cache_len + n keys.
    k_all, v_all = (t.transpose(1, 2).contiguous() for t in (k_rows, v_rows))
    q_bhnd = q.transpose(1, 2).contiguous()
    bytes_moved = 2 * B * S * H * D * 2 + 2 * B * n * H * D * 2  # K, V + q, out
    flops = 4 * B * H * n * S * D
    shape = f"B={B} S={S} n={n} H={H} D={D}"

    ours = ops.block_decode_attention(q, k_cache, v_cache, k_block, v_block, lens)
    reference = torch.nn.functional.scaled_dot_product_attention(q_bhnd.float(), k_all.float(), v_all.float())
    note = f"max abs diff vs fp32 SDPA {(ours.float() - reference.transpose(1, 2)).abs().max().item():.2e}"
    seconds = timer(lambda: ops.block_decode_attention(q, k_cache, v_cache, k_block, v_block, lens))
    rows = [row("decode", shape, "did_engine", seconds, bytes_moved, flops, note)]
    ours_bhnd = ours.transpose(1, 2)
    for label, backend in (("SDPA flash", SDPBackend.FLASH_ATTENTION),
                           ("SDPA efficient", SDPBackend.EFFICIENT_ATTENTION),
                           ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q_bhnd, k_all, v_all)

        seconds, note = try_time(timer, run, ours_bhnd)
        rows.append(row("decode", shape, label, seconds, bytes_moved, flops, note))
    if flex is not None:
        seconds, note = try_time(timer, lambda: flex(q_bhnd, k_all, v_all), ours_bhnd)
        rows.append(row("decode", shape, "FlexAttention (compiled)", seconds, bytes_moved, flops, note))
    if xops is not None:
        # Padded keys: row b's keys at [b * S, b * S + S) of one [1, B * S, H, D] tensor.
        from xformers.ops.fmha import triton_splitk
        from xformers.ops.fmha.attn_bias import BlockDiagonalPaddedKeysMask

        q_x = q.reshape(1, B * n, H, D)
        k_x, v_x = k_rows.reshape(1, B * S, H, D), v_rows.reshape(1, B * S, H, D)
        bias = BlockDiagonalPaddedKeysMask.from_seqlens([n] * B, S, [S] * B, device=q.device)
        seconds, note = try_time(
            timer,
            lambda: xops.memory_efficient_attention_forward(q_x, k_x, v_x, attn_bias=bias, op=triton_splitk.FwOp),
            ours.reshape(1, B * n, H, D),
        )
        rows.append(row("decode", shape, "xformers split-K (padded keys)", seconds, bytes_moved, flops, note))
    return rows


def bench_decode(torch, timer: Timer, flex, xops, quick: bool):
    rows = []
    for B, S, n in decode_shapes(quick):
        rows += bench_decode_shape(torch, timer, flex, xops, B, S, n)
        torch.cuda.empty_cache()
    return rows


def bench_remask(torch, timer: Timer):
    from did_engine import ops

    B, S, k, mask_id = 64, 1024, 256, 50257
    pristine_tokens = torch.randint(0, mask_id, (B, S), device="cuda")
    pristine_confidence = torch.rand(B, S, device="cuda")
    tokens, confidence = pristine_tokens.clone(), pristine_confidence.clone()
    eligible = torch.rand(B, S, device="cuda") < 0.9
    eligible[:, :64] = False  # a prompt
    counts = torch.full((B,), k, device="cuda")
    shape = f"B={B} S={S} k={k}"
    # Reads confidence + eligible, writes tokens/confidence at k positions and [B, k] indices.
    bytes_moved = B * S * (4 + 1) + B * k * (8 + 4 + 8)

    def restore():  # both write +inf / mask_id into their inputs: time each on fresh ones
        tokens.copy_(pristine_tokens)
        confidence.copy_(pristine_confidence)

    def ours():
        return ops.snapshot_remask(tokens, confidence, counts, eligible, mask_id, float("inf"), max_k=k)

    def topk_scatter():
        candidates = confidence.masked_fill(~eligible, float("inf"))
        idx = candidates.topk(k, dim=1, largest=False, sorted=False).indices
        tokens.scatter_(1, idx, mask_id)
        confidence.scatter_(1, idx, float("inf"))
        return idx.sort(dim=1).values

    restore()
    ours_idx = ours()
    restore()
    same = torch.equal(topk_scatter(), ours_idx)
    rows = [row("remask", shape, "did_engine", timer(ours, setup=restore), bytes_moved, None, "one launch"),
            row("remask", shape, "torch.topk + scatter_ + sort", timer(topk_scatter, setup=restore), bytes_moved,
                None, "same indices" if same else "indices differ (ties)")]
    return rows


def bench_causal_shape(torch, timer: Timer, flex, xops, S: int, block_size: int):
    from did_engine import ops
    from did_engine.ops.reference import block_causal_mask

    B, H, D, dtype = 4, 12, 64, torch.bfloat16
    q = torch.randn(B, S, H, D, device="cuda", dtype=dtype)
    k = torch.randn(B, S, H, D, device="cuda", dtype=dtype)
    v = torch.randn(B, S, H, D, device="cuda", dtype=dtype)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    dense_mask = block_causal_mask(S, block_size, device="cuda")
    allowed_pairs = int(dense_mask.sum())
    bytes_moved = 4 * B * S * H * D * 2
    flops = 4 * B * H * allowed_pairs * D
    shape = f"B={B} S={S} bs={block_size} H={H} D={D}"

    ours = ops.block_causal_attention(q, k, v, block_size)
    reference = torch.nn.functional.scaled_dot_product_attention(qt.float(), kt.float(), vt.float(),
                                                                 attn_mask=dense_mask)
    note = f"max abs diff vs fp32 SDPA {(ours.float() - reference.transpose(1, 2)).abs().max().item():.2e}"
    del reference
    seconds = timer(lambda: ops.block_causal_attention(q, k, v, block_size))
    rows = [row("block-causal", shape, "did_engine", seconds, bytes_moved, flops, note)]
    ours_bhsd = ours.transpose(1, 2)
    seconds, note = try_time(
        timer, lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=dense_mask), ours_bhsd
    )
    rows.append(row("block-causal", shape, "SDPA dense mask", seconds, bytes_moved, flops, note))
    if flex is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx // block_size >= kv_idx // block_size

        try:
            block_mask = create_block_mask(mask_mod, None, None, S, S, device="cuda")
            seconds, note = try_time(timer, lambda: flex(qt, kt, vt, block_mask=block_mask), ours_bhsd)
        except Exception as exc:  # noqa: BLE001
            seconds, note = None, f"{type(exc).__name__}: {str(exc)[:80]}"
        rows.append(row("block-causal", shape, "FlexAttention block mask (compiled)", seconds, bytes_moved, flops,
                        note))
    if xops is not None:
        from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask, BlockDiagonalGappyKeysMask

        q_x, k_x, v_x = (t.reshape(1, B * S, H, D) for t in (q, k, v))
        ours_x = ours.reshape(1, B * S, H, D)
        # Block-causal exactly: query block j of row b is one sequence whose keys are row b's
        # first min(S, (j + 1) * bs) keys (the key intervals of a row overlap: all start at b * S).
        blocks = -(-S // block_size)
        q_lens = [min(block_size, S - j * block_size) for j in range(blocks)] * B
        kv_starts = [b * S for b in range(B) for _ in range(blocks)] + [B * S]
        kv_lens = [min(S, (j + 1) * block_size) for j in range(blocks)] * B
        try:
            gappy = BlockDiagonalGappyKeysMask.from_seqlens(q_lens, kv_starts, kv_lens, device=q.device)
            seconds, note = try_time(timer, lambda: xops.memory_efficient_attention_forward(q_x, k_x, v_x, gappy),
                                     ours_x)
        except Exception as exc:  # noqa: BLE001
            seconds, note = None, f"{type(exc).__name__}: {str(exc)[:80]}"
        rows.append(row("block-causal", shape, "xformers block-diagonal gappy keys (block-causal)", seconds,
                        bytes_moved, flops, note))
        causal = BlockDiagonalCausalMask.from_seqlens([S] * B, device=q.device)
        seconds, note = try_time(timer, lambda: xops.memory_efficient_attention_forward(q_x, k_x, v_x, causal))
        token_causal_flops = 4 * B * H * (S * (S + 1) // 2) * D
        rows.append(row("block-causal", shape, "xformers BlockDiagonalCausalMask (token-causal)", seconds,
                        bytes_moved, token_causal_flops, (note + "; " if note else "") + "a different mask: speed only"))
    return rows


def bench_causal(torch, timer: Timer, flex, xops, quick: bool):
    rows = []
    for S, block_size in causal_shapes(quick):
        rows += bench_causal_shape(torch, timer, flex, xops, S, block_size)
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------
# Report


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def xformers_version(xops) -> str:
    if xops is None:
        return "not used"
    import xformers

    return xformers.__version__


def format_table(rows, copy_bw: float) -> list[str]:
    lines = ["| shape | implementation | time (us) | GB/s | % of copy BW | TFLOP/s | notes |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        if row["seconds"] is None:
            lines.append(f"| {row['shape']} | {row['impl']} | n/a | | | | {row['note']} |")
            continue
        gbps = row["bytes"] / row["seconds"] / 1e9
        tflops = f"{row['flops'] / row['seconds'] / 1e12:.1f}" if row["flops"] else ""
        lines.append(
            f"| {row['shape']} | {row['impl']} | {row['seconds'] * 1e6:.1f} | {gbps:.0f} | "
            f"{100 * row['bytes'] / row['seconds'] / copy_bw:.0f}% | {tflops} | {row['note']} |"
        )
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py: no CUDA device is available (torch.cuda.is_available() is False); "
                 "run it on a machine with an NVIDIA GPU and a CUDA build of torch.")
    sys.path.insert(0, ROOT)
    try:
        import did_engine
    except ImportError as exc:
        sys.exit(f"bench_cuda.py: did_engine is not built here ({exc}); "
                 "run `pip install --no-build-isolation -e .` on this machine first.")
    missing = [op for op in did_engine.ops.OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"did_engine::{op}", "CUDA")]
    if missing:
        sys.exit(f"bench_cuda.py: did_engine was built without CUDA kernels for {missing}; rebuild with "
                 "`DID_ENGINE_CUDA=1 pip install --no-build-isolation -e .`.")

    only = set(args.only or BENCHMARKS)
    timer = Timer(torch, args.iters, args.warmup, flush_l2=not args.warm_l2)
    copy_bw = copy_bandwidth(torch, timer)
    device = torch.cuda.get_device_name()
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"{device}: copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
    flex = None if args.no_flex or not (only & {"decode", "causal"}) else compile_flex(torch)
    xops = load_xformers(args.no_xformers) if only & {"decode", "causal"} else None

    sections = []
    if "decode" in only:
        sections.append(("Decode attention (bf16, no mask, full caches)",
                         bench_decode(torch, timer, flex, xops, args.quick)))
    if "remask" in only:
        sections.append(("Snapshot remask", bench_remask(torch, timer)))
    if "causal" in only:
        sections.append(("Block-causal attention (bf16)", bench_causal(torch, timer, flex, xops, args.quick)))

    lines = [
        "# did_engine CUDA kernel benchmarks",
        "",
        f"- device: {device} (driver {driver_version()})",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, did_engine {did_engine.__version__}",
        f"- date: {now.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- measured device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (1 GiB tensor copy, read + write)",
        f"- median of {args.iters} timed calls after {args.warmup} warm-up calls; L2 "
        f"{'warm' if args.warm_l2 else 'flushed before each call'}",
        "- GB/s: logical minimum traffic (inputs read once, outputs written once) / time; the SDPA, Flex and "
        "xformers baselines get their [cache; block] keys pre-concatenated (not timed)",
        f"- xformers: {xformers_version(xops)}",
        "",
    ]
    for title, rows in sections:
        lines += [f"## {title}", ""] + format_table(rows, copy_bw) + [""]
    text = "\n".join(lines)
    print(text)

    out = args.out
    if out is None:
        slug = "".join(c if c.isalnum() else "_" for c in device).strip("_").lower()
        out = os.path.join(ROOT, "bench", "results", f"cuda_{slug}_{now.strftime('%Y%m%d_%H%M')}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
