"""One decode step of a BlockDiffusionLM: our KV-cached decode vs BD3-LM's compute pattern.

    python bench/bench_model_decode.py                   # small preset, cache 256/1024/4096, batch 1/8
    python bench/bench_model_decode.py --preset tiny --cache-lens 64,256 --batches 1,8
    python bench/bench_model_decode.py --save            # write bench/results/model_decode_cpu_<date>.md

Ours: ``model.decode(block, cache)``: queries, keys and values for the n block tokens
only; cached keys were rotated once when committed; attention of the n queries over
cache + block.

BD3-LM's pattern (emulated here with the same weights, following its sampler): it caches
q, k, v of the window *before* rotary, so every step it copies the whole window's q/k/v,
re-applies rotary to all of it, runs full-window attention for every window position and
keeps only the last block's rows. Both compute the same logits (checked in the run).
Random weights; float32 (bf16 matmuls are slow on CPUs without bf16 instructions).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import ours_vs_baseline_row, save_results  # noqa: E402

from did_engine.modeling import BlockDiffusionLM  # noqa: E402
from did_engine.modeling.layers import apply_rotary, modulate  # noqa: E402


class BD3LMStyleCache:
    """Per layer, the window's q/k/v before rotary, [B, W, 3 * dim] (BD3-LM's layout)."""

    def __init__(self, model: BlockDiffusionLM, tokens: torch.Tensor):
        self.qkv = []
        x = model.vocab_embed(tokens)
        c = model._conditioning(tokens.shape[0], None, tokens.device)
        cos, sin = model.rotary_emb.cos_sin(torch.arange(tokens.shape[1]))
        for block in model.blocks:
            shift1, scale1, *_ = block.adaLN_modulation(c)[:, None].chunk(6, dim=2)
            self.qkv.append(block.attn_qkv(modulate(block.norm1(x), shift1, scale1)))

            def attend(q, k, v):
                return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (
                    apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v))).transpose(1, 2)
            x = block(x, c, attend)


def bd3lm_style_decode(model: BlockDiffusionLM, block_tokens: torch.Tensor, cache: BD3LMStyleCache):
    B, n = block_tokens.shape
    H = model.config.n_heads
    x = model.vocab_embed(block_tokens)
    c = model._conditioning(B, None, block_tokens.device)
    for layer, block in enumerate(model.blocks):
        shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        new_qkv = block.attn_qkv(modulate(block.norm1(x), shift1, scale1))  # [B, n, 3*dim]
        window = torch.cat([cache.qkv[layer], new_qkv], dim=1)  # [B, W, 3*dim]: a full copy each step
        W = window.shape[1]
        qkv = window.view(B, W, 3, H, -1)
        cos, sin = model.rotary_emb.cos_sin(torch.arange(W))  # positions 0..W-1, recomputed
        q, k = apply_rotary(qkv[:, :, 0], cos, sin), apply_rotary(qkv[:, :, 1], cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, 2].transpose(1, 2))
        out = out.transpose(1, 2)[:, -n:].reshape(B, n, -1)  # only the last block's rows are kept
        x = x + gate1 * block.attn_out(out)
        x = x + gate2 * block.mlp(modulate(block.norm2(x), shift2, scale2))
    return model.output_layer(x, c)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model preset (tiny or small)")
    parser.add_argument("--cache-lens", default="256,1024,4096", help="comma-separated cache lengths")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--block", type=int, default=4, help="active block size n")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--save", action="store_true", help="write bench/results/model_decode_cpu_<date>.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cache_lens = [int(s) for s in args.cache_lens.split(",")]
    batches = [int(s) for s in args.batches.split(",")]
    n = args.block
    torch.manual_seed(0)
    # The context must hold the longest cache plus the block; rotary has no length limit.
    model = BlockDiffusionLM.from_preset(args.preset, model_length=max(cache_lens) + n, block_size=n,
                                         dropout=0.0).eval()
    print(f"{args.preset}: {model.num_parameters() / 1e6:.1f}M parameters, float32, {torch.get_num_threads()} threads")

    header = "| batch | cache len | ours ms | BD3-LM pattern ms | speed-up | ours tokens/s | max abs diff |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    print(header)
    with torch.inference_mode():
        for B in batches:
            for S in cache_lens:
                g = torch.Generator().manual_seed(S + B)
                context = torch.randint(0, model.config.vocab_size - 1, (B, S), generator=g)
                block = torch.randint(0, model.config.vocab_size, (B, n), generator=g)
                cache = model.new_kv_cache(B, max_len=S)
                model.commit(context, cache)  # one chunk: the cache contents only need to match below
                bd3_cache = BD3LMStyleCache(model, context)
                ours_logits = model.decode(block, cache)
                diff = (ours_logits - bd3lm_style_decode(model, block, bd3_cache)).abs().max().item()
                line = ours_vs_baseline_row((B, S), lambda: model.decode(block, cache),
                                            lambda: bd3lm_style_decode(model, block, bd3_cache), B * n, diff)
                lines.append(line)
                print(line, flush=True)
    if args.save:
        save_results("model_decode_cpu", f"One decode step, {args.preset} preset, block {n}, float32",
                     "bench_model_decode.py", argv, "\n".join(lines),
                     "\nSpeed-up = BD3-LM pattern time / our time. Tokens/s counts the block's n tokens per step.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
