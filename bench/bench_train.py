"""Training tokens/s: our mix-scale step vs the same step written the dense way.

    python bench/bench_train.py                       # tiny (L 32, batch 16) and small (L 256, batch 2)
    python bench/bench_train.py --presets small --small-seq-len 1024 --small-batch 1
    python bench/bench_train.py --save                # write bench/results/train_cpu_<date>.md

One step = forward + backward + AdamW update on a global batch whose rows draw their
block size from {4: 0.9, L: 0.1}; fp32; the same weights, data and noise for both.

Ours: ``MixScaleLoss`` (what ``did-engine train`` runs): rows grouped by block size; for
b < L the vectorised cat(x_t, x_0) forward under the block diffusion mask (SDPA with the
dense 2L x 2L mask inside the model); for b = L a plain global forward on the L tokens
(the x_0 half is useless there); the NELBO from one logsumexp per token.

Dense reference: every group, b = L included, runs cat(x_t, x_0) through SDPA with its
dense 2L x 2L mask (BD3-LM's vectorised training pattern), and the loss goes through the
full SUBS log-probability tensor [B, L, V] (BD3-LM's ``_subs_parameterization``), gathered
at x_0. Both compute the same loss (checked, printed as the relative difference).
tokens/s counts the L clean tokens of each sequence (not the 2L model inputs).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import machine_description, timeit  # noqa: E402

from did_engine.diffusion import LogLinearSchedule, subs_log_probs  # noqa: E402
from did_engine.modeling import BlockDiffusionLM  # noqa: E402
from did_engine.modeling.layers import apply_rotary, block_diffusion_mask, sdpa  # noqa: E402
from did_engine.training import TrainConfig  # noqa: E402
from did_engine.training.loss import MixScaleLoss, draw_batch_noise  # noqa: E402


def dense_loss(model: BlockDiffusionLM, x0, masked, t, sizes):
    """The reference step's loss: dense-mask SDPA over cat(x_t, x_0) for every block size."""
    B, L = x0.shape
    mask_id = model.config.mask_id
    total = x0.new_zeros((), dtype=torch.float32)
    cos, sin = model.rotary_emb.cos_sin(torch.arange(L).repeat(2))
    for b in sorted(set(sizes.tolist())):
        idx = (sizes == b).nonzero().flatten()
        x0_g, t_g = x0[idx], t[idx]
        x_t = torch.where(masked[idx], mask_id, x0_g)
        mask = block_diffusion_mask(L, b)  # [2L, 2L]

        def attend(q, k, v):
            return sdpa(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, mask)

        logits = model._run(torch.cat([x_t, x0_g], dim=1), None, lambda i: attend)[:, :L]  # [R, L, V]
        log_p = subs_log_probs(logits, x_t, mask_id)  # [R, L, V]
        nll = -log_p.gather(-1, x0_g[..., None]).squeeze(-1)  # [R, L]
        total = total + (nll / t_g).sum()
    return total / (B * L)


def bench_preset(name: str, seq_len: int, batch: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = BlockDiffusionLM.from_preset(name, model_length=seq_len, dropout=0.0).train()
    ref_model = copy.deepcopy(model)
    V = model.config.vocab_size
    cfg = TrainConfig(block_sizes={4: 0.9, "L": 0.1})
    probs = cfg.resolved_block_sizes(seq_len)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, V - 1, (batch, seq_len), generator=g)
    sizes, t, masked = draw_batch_noise(cfg, batch, seq_len, probs, cfg.resolved_clip(seq_len), g, LogLinearSchedule())
    if batch > 1 and len(set(sizes.tolist())) == 1:  # show both kinds of rows in the batch
        sizes[-1] = seq_len if sizes[0] != seq_len else 4
    ours = MixScaleLoss(model, list(probs), LogLinearSchedule())

    def make_step(module_loss, params):
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = module_loss()
            loss.backward()
            opt.step()
            return loss

        return step

    with torch.no_grad():
        a = ours(x0, masked, t, sizes)[0].item()
        b = dense_loss(ref_model, x0, masked, t, sizes).item()
    step_ours = make_step(lambda: ours(x0, masked, t, sizes)[0], model.parameters())
    step_dense = make_step(lambda: dense_loss(ref_model, x0, masked, t, sizes), ref_model.parameters())
    s_ours = timeit(step_ours, min_time=0.5, min_reps=2)
    s_dense = timeit(step_dense, min_time=0.5, min_reps=2)
    tokens = batch * seq_len
    return {"preset": name, "L": seq_len, "batch": batch, "rows_b_L": int((sizes == seq_len).sum()),
            "ours_ms": s_ours * 1e3, "dense_ms": s_dense * 1e3, "ours_tok_s": tokens / s_ours,
            "dense_tok_s": tokens / s_dense, "speedup": s_dense / s_ours, "loss_rel_diff": abs(a - b) / abs(b),
            "params_M": model.num_parameters() / 1e6}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small", help="comma list of presets to measure")
    p.add_argument("--tiny-seq-len", type=int, default=32, help="L of the tiny preset")
    p.add_argument("--tiny-batch", type=int, default=16, help="global batch of the tiny preset")
    p.add_argument("--small-seq-len", type=int, default=256,
                   help="L of the small preset (BD3-LM trains 1024; 256 keeps a CPU step to seconds)")
    p.add_argument("--small-batch", type=int, default=2, help="global batch of the small preset")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--save", action="store_true", help="write bench/results/train_cpu_<date>.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.presets.split(","):
        L = args.tiny_seq_len if name == "tiny" else args.small_seq_len
        B = args.tiny_batch if name == "tiny" else args.small_batch
        rows.append(bench_preset(name, L, B))
        print(f"measured {name}", file=sys.stderr)
    lines = [
        f"# Training step, mix {{4: 0.9, L: 0.1}}, float32, {torch.get_num_threads()} thread(s)", "",
        machine_description().rstrip(), f"- command: `python bench/bench_train.py {' '.join(argv or sys.argv[1:])}`", "",
        "Speed-up = dense reference time / our time (forward + backward + AdamW); tokens/s counts L per sequence.",
        "", "| preset | params | L | batch | rows with b = L | ours ms | dense ms | ours tok/s | dense tok/s | "
            "speed-up | loss rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['params_M']:.1f}M | {r['L']} | {r['batch']} | {r['rows_b_L']} | "
                     f"{r['ours_ms']:.1f} | {r['dense_ms']:.1f} | {r['ours_tok_s']:,.0f} | {r['dense_tok_s']:,.0f} | "
                     f"{r['speedup']:.2f}x | {r['loss_rel_diff']:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.save:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           f"train_cpu_{datetime.date.today().isoformat()}.md")
        with open(out, "w") as f:
            f.write(text)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
