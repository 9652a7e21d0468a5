"""One small call of every did_engine kernel, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python bench/gpu_sanitize_ops.py
    python bench/gpu_sanitize_ops.py --device cpu        # the same calls on the CPU kernels

Each call is also checked against the float64 reference of its op, so a run under the
sanitizer that reports nothing but computes garbage still fails (exit 1). Shapes are small
(the sanitizer slows kernels down 10-100x) but reach every kernel: the decode mma path
(bf16, fp16) with and without KV splits (the split path adds the combine kernel), the fp32
path, the block-causal mma and fp32 paths, kv_commit (copy + advance) and snapshot_remask.
Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1: with torch's caching allocator, a read past a
tensor's end lands inside a larger pooled block and memcheck cannot see it.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def close(name: str, out: torch.Tensor, ref: torch.Tensor, rel: float) -> bool:
    err = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    ok = bool(torch.isfinite(out).all()) and err <= rel
    print(f"  {name:<44} rel err {err:.2e} (limit {rel:.0e}) {'ok' if ok else 'FAILED'}", flush=True)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    args = parser.parse_args(argv)
    import did_engine  # noqa: F401 - registers the ops
    from did_engine import ops
    from did_engine.ops import reference as R

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize_ops: no CUDA device", file=sys.stderr)
        return 2
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    t0 = time.perf_counter()
    ok = True
    rel_of = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
    # Decode: (dtype, S_max, cache lengths). S_max 4096 with long rows makes the kernel split
    # the keys across blocks and combine them (the combine kernel).
    for dtype, s_max, lens in [(torch.bfloat16, 300, [100, 37]), (torch.float16, 300, [0, 299]),
                               (torch.float32, 300, [100, 37]), (torch.bfloat16, 4096, [4090, 3000]),
                               (torch.float32, 4096, [4090, 1])]:
        B, n, H, H_kv, D = len(lens), 4, 4, 2, 64
        q, kb, vb = randn(B, n, H, D, dtype=dtype), randn(B, n, H_kv, D, dtype=dtype), randn(B, n, H_kv, D, dtype=dtype)
        kc, vc = randn(B, s_max, H_kv, D, dtype=dtype), randn(B, s_max, H_kv, D, dtype=dtype)
        cache_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        out = ops.block_decode_attention(q, kc, vc, kb, vb, cache_lens)
        ref = R.reference_block_decode_attention(*(t.double() for t in (q, kc, vc, kb, vb)), cache_lens)
        ok &= close(f"block_decode_attention {str(dtype)[6:]} S_max={s_max} lens={lens}", out, ref, rel_of[dtype])
    for dtype in (torch.bfloat16, torch.float32):
        B, S_max, n, H, D = 3, 64, 5, 2, 64
        kc, vc = randn(B, S_max, H, D, dtype=dtype), randn(B, S_max, H, D, dtype=dtype)
        kb, vb = randn(B, n, H, D, dtype=dtype), randn(B, n, H, D, dtype=dtype)
        lens = torch.tensor([0, 17, S_max - n], dtype=torch.int32, device=device)
        want_k, want_v, want_lens = R.reference_kv_commit(kc, vc, kb, vb, lens)
        ops.kv_commit(kc, vc, kb, vb, lens)
        same = torch.equal(kc, want_k) and torch.equal(vc, want_v) and torch.equal(lens, want_lens)
        print(f"  {'kv_commit ' + str(dtype)[6:]:<44} {'ok' if same else 'FAILED'}", flush=True)
        ok &= same
    for dtype, S, b in [(torch.bfloat16, 100, 4), (torch.float16, 67, 16), (torch.float32, 100, 7)]:
        q, k, v = (randn(2, S, 4, 64, dtype=dtype) for _ in range(3))
        out = ops.block_causal_attention(q, k, v, b)
        ref = R.reference_block_causal_attention(q.double(), k.double(), v.double(), b)
        ok &= close(f"block_causal_attention {str(dtype)[6:]} S={S} b={b}", out, ref, rel_of[dtype])
    B, S = 3, 50
    tokens = torch.randint(0, 1000, (B, S), generator=g).to(device)
    confidence = torch.rand(B, S, generator=g).to(device)
    eligible = torch.rand(B, S, generator=g).to(device) < 0.8
    counts = torch.tensor([5, 0, 20], device=device)
    want_tokens, want_conf, want_idx = R.reference_snapshot_remask(tokens, confidence, counts, eligible, 999, max_k=20)
    idx = ops.snapshot_remask(tokens, confidence, counts, eligible, 999, max_k=20)
    same = torch.equal(idx, want_idx) and torch.equal(tokens, want_tokens) and torch.equal(confidence, want_conf)
    print(f"  {'snapshot_remask B=3 S=50 k=[5,0,20]':<44} {'ok' if same else 'FAILED'}", flush=True)
    ok &= same
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"gpu_sanitize_ops on {device}: {'all calls ok' if ok else 'SOME CALLS FAILED'} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
