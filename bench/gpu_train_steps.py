"""A few training steps with bf16 autocast: compiled FlexAttention against dense-mask SDPA.

    python bench/gpu_train_steps.py --out results.md               # small preset, L = 1024, CUDA
    python bench/gpu_train_steps.py --device cpu --preset tiny --seq-len 32 --batch 4

Both paths start from the same weights and see the same batches (mix-scale rows: all at
block 4 but the last, at L; the loss of did_engine.training.loss.MixScaleLoss, AdamW). Checked: the first
step's losses agree (bf16 tolerance), every loss is finite, the flex path is labelled
"flex-compiled" (an eager fallback would warn and say "flex-eager"). Also timed: the
attention alone, forward + backward, [B, 12 heads, 2L, 64] bf16, FlexAttention with the
block mask against SDPA with the dense [2L, 2L] mask. FlexAttention has no backward on a
CPU, so there the flex training steps are skipped (and say so).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_generate import finish, parse_and_open, sync  # noqa: E402


def attention_only(device, B: int, L: int, block_size: int, reps: int) -> list:
    from did_engine.modeling.layers import FLEX_TRAINING_ATTENTION, block_diffusion_mask, sdpa

    H, D = 12, 64
    q, k, v = (torch.randn(B, 2 * L, H, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, 2 * L, H, D, device=device, dtype=torch.bfloat16)
    mask = block_diffusion_mask(L, block_size, device=device)
    rows = []
    for name, fn in [("SDPA, dense bool mask", lambda: sdpa(q, k, v, mask)),
                     ("FlexAttention, block mask", lambda: FLEX_TRAINING_ATTENTION(q, k, v, L, block_size))]:
        def step():
            out = fn()
            out.backward(grad)
            return out
        t0 = time.perf_counter()
        ref = step()  # compiles the flex path
        sync(device)
        first = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(times) * 1e3, first, ref.detach().float()))
    (_, _, _, a), (_, _, _, b) = rows
    rel = ((a - b).norm() / b.norm()).item()
    return [(name, ms, first) for name, ms, first, _ in rows], rel


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (after one warm-up step)")
    t_start = time.perf_counter()
    args, device = parse_and_open(parser, argv, "gpu_train_steps")
    if device is None:
        return 2
    from did_engine.diffusion import LogLinearSchedule
    from did_engine.modeling import BlockDiffusionLM
    from did_engine.training import TrainConfig
    from did_engine.training.loss import MixScaleLoss, draw_batch_noise

    L, B = args.seq_len, args.batch
    amp = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    base = BlockDiffusionLM.from_preset(args.preset, model_length=L, dropout=0.0)
    cfg = TrainConfig(block_sizes={4: 0.9, "L": 0.1})
    probs = cfg.resolved_block_sizes(L)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps + 1):
        x0 = torch.randint(0, base.config.mask_id, (B, L), generator=g)
        sizes, t, masked = draw_batch_noise(cfg, B, L, probs, cfg.resolved_clip(L), g, LogLinearSchedule())
        # The same split every step (the last row global, the rest block 4): each step then
        # has the same shapes, so FlexAttention compiles once, in the warm-up step.
        sizes = torch.full_like(sizes, 4)
        sizes[-1] = L
        batches.append(tuple(x.to(device) for x in (x0, masked, t)) + (sizes,))
    paths = ["sdpa", "flex"] if device.type == "cuda" else ["sdpa"]
    lines = [f"Preset {args.preset} ({base.num_parameters() / 1e6:.1f}M parameters), L = {L}, batch {B}, "
             f"rows at block 4 except the last at L, autocast {amp}, AdamW, {device}.", "",
             "| attention | label | first step s (compile) | ms/step | tokens/s | loss first -> last |",
             "|---|---|---|---|---|---|"]
    ok, first_losses = True, {}
    for path in paths:
        model = copy.deepcopy(base).to(device).train()
        model.training_attention = path
        loss_fn = MixScaleLoss(model, list(probs), LogLinearSchedule(), amp_dtype=amp)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        losses, times = [], []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            for i, (x0, masked, t, sizes) in enumerate(batches):
                sync(device)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss, _ = loss_fn(x0, masked, t, sizes)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                times.append(time.perf_counter() - t0)
        for w in caught:
            print(f"WARNING ({path}): {w.message}", flush=True)
        label = model.last_training_attention
        ok &= all(map(lambda x: x == x and abs(x) < float("inf"), losses))
        if path == "flex":
            ok &= label == "flex-compiled"
        first_losses[path] = losses[0]
        ms = statistics.median(times[1:]) * 1e3
        lines.append(f"| {path} | {label} | {times[0]:.1f} | {ms:.1f} | {B * L / ms * 1e3:.0f} | "
                     f"{losses[0]:.4f} -> {losses[-1]:.4f} |")
        print(lines[-1], flush=True)
    if device.type != "cuda":
        lines.append("| flex | - | - | - | - | skipped: FlexAttention has no backward on a CPU |")
        print(lines[-1], flush=True)
    if len(first_losses) == 2:
        rel = abs(first_losses["flex"] - first_losses["sdpa"]) / abs(first_losses["sdpa"])
        ok &= rel < 2e-2
        lines.append(f"\nFirst-step loss, flex vs SDPA: relative difference {rel:.2e} (limit 2e-2, bf16).")
        print(lines[-1], flush=True)
    if device.type == "cuda":
        # B - 1 rows: the block-4 group of the steps above, so its compiled function is reused.
        rows, rel = attention_only(device, B - 1, L, 4, reps=10)
        lines += ["", f"Attention alone, forward + backward, [B={B - 1}, H=12, 2L={2 * L}, D=64] bf16, block 4:", "",
                  "| implementation | ms | first call s |", "|---|---|---|"]
        lines += [f"| {name} | {ms:.2f} | {first:.1f} |" for name, ms, first in rows]
        lines.append(f"\nSpeed-up of FlexAttention: {rows[0][1] / rows[1][1]:.1f}x; outputs differ by "
                     f"{rel:.2e} (relative norm).")
        ok &= rel < 2e-2
        print("\n".join(lines[-6:]), flush=True)
    return finish(args, "gpu_train_steps", lines, ok, t_start)


if __name__ == "__main__":
    sys.exit(main())
