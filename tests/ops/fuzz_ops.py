"""Fuzzing of the did_engine ops' arguments, each call isolated in a worker process.

A call is described by a *spec*: a small JSON-able dict (op, seed, sizes, layouts, value
kinds, scalar arguments, and at most one mutation of one tensor's rank, dtype or device).
``build_call`` turns a spec into arguments deterministically; ``classify`` runs the op
and sorts the outcome:

    ok        succeeded and matched the reference (float64, same-dtype error rule), or
              refused with ValueError/RuntimeError whose message names an argument
    unclear   an error of another type, or a message naming no argument
    wrong     succeeded but disagreed with the reference, or succeeded where the
              reference refuses the call
    crash     the worker process died (segfault, abort)
    hang      the call took longer than the per-call limit

Specs come from ``draw_spec(draw)``, where ``draw`` is either hypothesis (the test suite,
tests/ops/test_fuzz.py) or a seeded ``random.Random`` (this script). Run it standalone:

    python tests/ops/fuzz_ops.py --calls 10000            # prints the figures
    python tests/ops/fuzz_ops.py --spec '{"op": ...}'     # replays one spec in-process
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
import traceback

# did_engine.ops.OPS, restated: the parent process never imports torch (its workers do).
OPS = ("block_decode_attention", "kv_commit", "block_causal_attention", "snapshot_remask")
ARG_NAMES = {
    "block_decode_attention": ("q", "k_cache", "v_cache", "k_block", "v_block", "cache_lens", "scale"),
    "kv_commit": ("k_cache", "v_cache", "k_block", "v_block", "cache_lens"),
    "block_causal_attention": ("q", "k", "v", "block_size", "scale"),
    "snapshot_remask": ("tokens", "confidence", "num_remask", "eligible", "mask_id", "reset_value", "max_k"),
}
LAYOUTS = ("contiguous", "contiguous", "transposed", "sliced", "strided_last", "expanded")
VALUE_KINDS = ("normal", "normal", "normal", "big", "zeros", "nan", "inf", "-inf")
MUTATIONS = ("none",) * 16 + ("rank+1", "rank-1", "dtype", "meta")
MUTANT_DTYPES = ("float64", "float32", "bfloat16", "float16", "int32", "int64", "bool", "uint8")
SCALES = (None, None, None, None, 0.5, 0.0, -0.7, 1e-30, 1e30, 1e300, -1e300, "inf", "nan", 2)
# Scalar arguments as JSON: plain numbers, or tagged odd types.
BLOCK_SIZES = (1, 2, 3, 5, 7, 16, 64, 2**62, 2**63 - 1, 0, -1, 2**64, {"float": 2.5}, {"float": 2.0}, {"bool": True},
               {"str": "3"})
COUNT_FORMS = ("tensor64", "tensor64", "tensor32", "int", "int", {"float": 1.5}, {"bool": True}, "float_tensor")
PER_CALL_SECONDS = 20.0


# ---------------------------------------------------------------------------------------
# Specs


class RandomDraw:
    """The ``draw`` interface over random.Random: choice(options) and integer(lo, hi)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def choice(self, options):
        return self.rng.choice(list(options))

    def integer(self, lo, hi):
        return self.rng.randint(lo, hi)


def draw_spec(draw) -> dict:
    """One call: every random decision goes through draw.choice / draw.integer."""
    op = draw.choice(OPS)
    spec = {"op": op, "seed": draw.integer(0, 2**31 - 1), "dtype": draw.choice(["float32", "bfloat16", "float16"])}
    spec["B"] = draw.choice([0, 1, 1, 2, 3, 5])
    spec["H_kv"] = draw.choice([1, 1, 2, 3, 3, 0])
    spec["group"] = draw.choice([1, 1, 2, 3])
    spec["D"] = draw.choice([1, 3, 16, 33, 64, 64, 80, 0])
    if op in ("block_decode_attention", "kv_commit"):
        spec["S_max"] = draw.choice([0, 1, 5, 40, 40, 300, 600])
        spec["n"] = draw.choice([1, 2, 4, 7, 16, 16, 0])
        if op == "kv_commit" and draw.choice(["fits", "fits", "fits", "any"]) == "fits":
            spec["n"] = min(spec["n"], spec["S_max"])
        spec["lens"] = draw.choice(["valid"] * 6 + ["full", "negative", "over", "int_min", "int_max"])
    if op == "block_causal_attention":
        spec["S"] = draw.choice([0, 1, 2, 7, 33, 130, 300])
        spec["block_size"] = draw.choice(BLOCK_SIZES)
    if op in ("block_decode_attention", "block_causal_attention"):
        spec["scale"] = draw.choice(SCALES)
    if op == "snapshot_remask":
        spec["S"] = draw.choice([0, 1, 2, 7, 33, 130, 300])
        spec["counts"] = draw.choice(COUNT_FORMS)
        spec["count_values"] = draw.choice(["valid"] * 4 + ["zero", "all", "over_eligible", "negative", "over_S"])
        spec["max_k"] = draw.choice([None, None, None, "fit", "fit", "fit+2", "above_S", -1, {"float": 2.5}])
        spec["mask_id"] = draw.choice([7, 7, 7, 7, 0, -1, 2**63, {"float": 7.5}])
        spec["reset_value"] = draw.choice(["inf", "inf", "nan", 0.0, -3.0, {"str": "x"}])
        spec["confidence_kind"] = draw.choice(["normal", "ties", "nan", "inf", "zeros"])
    names = [n for n in ARG_NAMES[op] if n not in ("scale", "block_size", "mask_id", "reset_value", "max_k")]
    spec["layouts"] = {name: draw.choice(LAYOUTS) for name in names}
    spec["value_kind"] = draw.choice(VALUE_KINDS)
    spec["value_target"] = draw.choice(names)
    spec["mutation"] = draw.choice(MUTATIONS)
    spec["mutation_target"] = draw.choice(names)
    spec["mutant_dtype"] = draw.choice(MUTANT_DTYPES)
    return spec


# ---------------------------------------------------------------------------------------
# Building a call


def _scalar(value):
    """A JSON scalar back to the Python value it stands for."""
    if isinstance(value, dict):
        (kind, v), = value.items()
        return {"float": float, "bool": bool, "str": str}[kind](v)
    if value in ("inf", "nan"):
        return float(value)
    return value


def _layout(torch, base, layout, gen):
    """base (contiguous) viewed through `layout`, same logical shape and values."""
    shape = list(base.shape)
    if layout == "contiguous" or base.dim() == 0:
        return base
    if layout == "expanded":  # dim 0 broadcast from the first row (stride 0)
        return base[:1].expand(shape) if shape[0] > 0 else base
    if layout == "transposed":
        if base.dim() < 2:
            return base
        return base.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "sliced":  # every other element of a wider dim 0
        wide = torch.empty([2 * shape[0]] + shape[1:], dtype=base.dtype)
        view = wide[1::2]
        view.copy_(base)
        return view
    if layout == "strided_last":
        wide = torch.empty(shape + [2], dtype=base.dtype)
        view = wide[..., 1]
        view.copy_(base)
        return view
    raise AssertionError(layout)


def _put_special(torch, t, kind, gen):
    """Writes NaN / inf / -inf at one random element of a float tensor (in place)."""
    if t.numel() == 0 or not t.is_floating_point():
        return
    flat = t.view(-1)
    flat[int(torch.randint(0, t.numel(), (1,), generator=gen))] = float(kind)


def build_call(spec):
    """(function, args tuple, reference function or None) for a spec; deterministic."""
    import torch

    from did_engine import ops

    gen = torch.Generator().manual_seed(spec["seed"])
    op = spec["op"]
    dtype = getattr(torch, spec["dtype"])
    B, H_kv, group, D = spec["B"], spec["H_kv"], spec["group"], spec["D"]
    H = H_kv * group
    kind = spec["value_kind"]

    def floats(name, shape):
        mult = 30.0 if kind == "big" and spec["value_target"] == name else 1.0
        base = (torch.randn(shape, generator=gen) * mult).to(dtype)
        if kind == "zeros" and spec["value_target"] == name:
            base.zero_()
        if kind in ("nan", "inf", "-inf") and spec["value_target"] == name:
            _put_special(torch, base, kind, gen)
        return base

    tensors = {}
    scalars = {}
    if op in ("block_decode_attention", "kv_commit"):
        S_max, n = spec["S_max"], spec["n"]
        if op == "block_decode_attention":
            tensors["q"] = floats("q", [B, n, H, D])
        tensors["k_cache"] = floats("k_cache", [B, S_max, H_kv, D])
        tensors["v_cache"] = floats("v_cache", [B, S_max, H_kv, D])
        tensors["k_block"] = floats("k_block", [B, n, H_kv, D])
        tensors["v_block"] = floats("v_block", [B, n, H_kv, D])
        room = S_max - (n if op == "kv_commit" else 0)
        lens = torch.randint(0, max(room, 0) + 1, (B,), generator=gen)
        if B:
            bad = {"full": room, "negative": -1, "over": room + 1, "int_min": -(2**31), "int_max": 2**31 - 1}
            lens[int(torch.randint(0, B, (1,), generator=gen))] = bad.get(spec["lens"], int(lens[0]))
        tensors["cache_lens"] = lens.to(torch.int32)
        if op == "block_decode_attention":
            scalars["scale"] = _scalar(spec["scale"])
    elif op == "block_causal_attention":
        S = spec["S"]
        tensors["q"] = floats("q", [B, S, H, D])
        tensors["k"] = floats("k", [B, S, H_kv, D])
        tensors["v"] = floats("v", [B, S, H_kv, D])
        scalars["block_size"] = _scalar(spec["block_size"])
        scalars["scale"] = _scalar(spec["scale"])
    else:
        S = spec["S"]
        tensors["tokens"] = torch.randint(0, 50, (B, S), generator=gen)
        ck = spec["confidence_kind"]
        conf = torch.rand(B, S, generator=gen)
        if ck == "ties":
            conf = (conf * 4).floor() / 4
        elif ck == "zeros":
            conf.zero_()
        elif ck in ("nan", "inf"):
            conf[torch.rand(B, S, generator=gen) < 0.2] = float(ck)
        if kind in ("nan", "inf", "-inf") and spec["value_target"] == "confidence":
            _put_special(torch, conf, kind, gen)
        tensors["confidence"] = conf
        eligible = torch.rand(B, S, generator=gen) < 0.7
        tensors["eligible"] = eligible
        n_elig = eligible.sum(1)
        counts = (torch.rand(B, generator=gen) * (n_elig + 1)).floor().long().clamp(max=n_elig)
        cv = spec["count_values"]
        if cv == "zero":
            counts.zero_()
        elif cv == "all":
            counts = n_elig.clone()
        elif B and cv == "over_eligible":
            counts[-1] = n_elig[-1] + 1
        elif B and cv == "negative":
            counts[0] = -1
        elif B and cv == "over_S":
            counts[0] = S + 1
        form = spec["counts"]
        if form == "tensor32":
            tensors["num_remask"] = counts.int()
        elif form == "float_tensor":
            tensors["num_remask"] = counts.float()
        elif form == "tensor64":
            tensors["num_remask"] = counts
        else:
            same = int(counts.min()) if B else (S + 1 if cv == "over_S" else 0)
            scalars["num_remask"] = same if form == "int" else _scalar(form)
        max_k = spec["max_k"]
        top = int(counts.max()) if B else 0
        named = {"fit": top, "fit+2": min(S, top + 2), "above_S": S + 1}
        scalars["max_k"] = named[max_k] if isinstance(max_k, str) else _scalar(max_k)
        scalars["mask_id"] = _scalar(spec["mask_id"])
        scalars["reset_value"] = _scalar(spec["reset_value"])

    for name, t in tensors.items():
        tensors[name] = _layout(torch, t, spec["layouts"].get(name, "contiguous"), gen)
    target, mutation = spec["mutation_target"], spec["mutation"]
    if target in tensors and mutation != "none":
        t = tensors[target]
        if mutation == "rank+1":
            t = t[None]
        elif mutation == "rank-1":
            t = t.flatten(0, 1) if t.dim() >= 2 else t.sum()
        elif mutation == "dtype":
            t = t.to(getattr(torch, spec["mutant_dtype"]))
        elif mutation == "meta":
            t = t.to("meta")
        tensors[target] = t

    names = ARG_NAMES[op]
    values = {**tensors, **scalars}
    if op == "block_decode_attention":
        fn = ops.block_decode_attention
        args = tuple(values[n] for n in names[:6])
        kwargs = {"scale": values["scale"]}
    elif op == "block_causal_attention":
        fn = ops.block_causal_attention
        args = (values["q"], values["k"], values["v"], values["block_size"])
        kwargs = {"scale": values["scale"]}
    elif op == "kv_commit":
        fn = ops.kv_commit
        args = tuple(values[n] for n in names)
        kwargs = {}
    else:
        fn = ops.snapshot_remask
        args = (values["tokens"], values["confidence"], values["num_remask"], values["eligible"], values["mask_id"])
        kwargs = {"reset_value": values["reset_value"], "max_k": values["max_k"]}
    return fn, args, kwargs


# ---------------------------------------------------------------------------------------
# Running and judging one call (inside the worker)


def _names_an_argument(op, message):
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", message) for name in ARG_NAMES[op])


def _attention_verdict(torch, out, ref64, ref_same):
    """None if out agrees with the float64 reference under the same-dtype error rule."""
    if out.shape != ref64.shape:
        return f"shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    out64 = out.double()
    bad64 = ~torch.isfinite(ref64)
    # A NaN/inf in the inputs must show in exactly the outputs the reference has it in.
    if not torch.equal(bad64, ~torch.isfinite(out64)):
        # Tolerated only where the same computation in the kernel's dtype also leaves
        # float32's range (e.g. scale 1e30 times large scores): a range limit, documented.
        mismatch = bad64 != ~torch.isfinite(out64)
        if bool((mismatch & torch.isfinite(ref_same.double())).any()):
            return "non-finite outputs differ from the reference's"
    ok = torch.isfinite(ref64) & torch.isfinite(out64) & torch.isfinite(ref_same.double())
    if not bool(ok.any()):
        return None
    err = (out64 - ref64).abs()[ok].max().item()
    ref_err = (ref_same.double() - ref64).abs()[ok].max().item()
    slack = 1e-5 * max(1.0, ref64[ok].abs().max().item())
    limit = (1e-5 if out.dtype == torch.float32 else 0.0) + 2 * ref_err + slack
    return None if err <= limit else f"max abs error {err:.3g} > {limit:.3g}"


def _equal_nan(torch, a, b):
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def classify(spec):
    """(outcome, detail) of one call, outcome in ok / unclear / wrong (runs it in-process)."""
    import torch

    from did_engine.ops import reference as ref

    op = spec["op"]
    # Self-test specs of the harness (tests/ops/test_fuzz.py).
    if op == "__crash__":
        os.kill(os.getpid(), signal.SIGSEGV)
    if op == "__hang__":
        time.sleep(3600)
    if op == "__ok__":
        return "ok", "harness self-test"
    fn, args, kwargs = build_call(spec)
    before = [a.clone() if torch.is_tensor(a) and a.device.type != "meta" else a for a in args]
    try:
        out = fn(*args, **kwargs)
    except (ValueError, RuntimeError) as e:
        message = str(e).splitlines()[0] if str(e) else ""
        if _names_an_argument(op, message):
            return "ok", f"refused: {message[:160]}"
        return "unclear", f"{type(e).__name__}: {message[:300]}"
    except Exception as e:  # noqa: BLE001 (the point: any other exception is an unclear error)
        return "unclear", f"{type(e).__name__}: {str(e)[:300]}"

    # Succeeded: compare with the reference on the inputs as they were before the call.
    try:
        if op == "kv_commit":
            want = ref.reference_kv_commit(*before)
            got = (args[0], args[1], args[4])
        elif op == "snapshot_remask":
            tokens, conf, counts, eligible, mask_id = before
            want = ref.reference_snapshot_remask(tokens, conf, counts, eligible, mask_id, kwargs["reset_value"],
                                                 kwargs["max_k"])
            got = (args[0], args[1], out)
        else:
            scale = kwargs["scale"]
            if op == "block_decode_attention":
                f64 = [a.double() for a in before[:5]]
                ref64 = ref.reference_block_decode_attention(*f64, before[5], scale=scale)
                ref_same = ref.reference_block_decode_attention(*before, scale=scale)
            else:
                f64 = [a.double() for a in before[:3]]
                ref64 = ref.reference_block_causal_attention(*f64, before[3], scale=scale)
                ref_same = ref.reference_block_causal_attention(*before, scale=scale)
            verdict = _attention_verdict(torch, out, ref64, ref_same)
            return ("ok", "matched") if verdict is None else ("wrong", verdict)
    except (ValueError, RuntimeError, IndexError) as e:
        return "wrong", f"the op succeeded but the reference refuses: {type(e).__name__}: {str(e)[:200]}"
    for name, g, w in zip(("first output", "second output", "third output"), got, want):
        if not _equal_nan(torch, g, w):
            return "wrong", f"{name} differs from the reference"
    return "ok", "matched"


def worker_main():
    """Reads one JSON spec per line on stdin, writes one JSON verdict per line on stdout."""
    import torch  # noqa: F401

    import did_engine.ops  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        spec = json.loads(line)
        try:
            outcome, detail = classify(spec)
        except Exception:  # noqa: BLE001 (a harness failure is reported, not hidden)
            outcome, detail = "unclear", "harness: " + traceback.format_exc(limit=3)[-400:]
        print(json.dumps({"outcome": outcome, "detail": detail}), flush=True)


# ---------------------------------------------------------------------------------------
# The parent side: a worker process with a per-call time limit


class Worker:
    """A worker process; run(spec) -> (outcome, detail), restarting after a crash or hang."""

    def __init__(self, per_call_seconds=PER_CALL_SECONDS):
        self.per_call_seconds = per_call_seconds
        self.proc = None

    def _start(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        line = self._read_line(120.0)
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError("fuzz worker did not start")

    def _read_line(self, timeout):
        """The next line; "" when the worker closed its output (it died), None on timeout."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else None

    def _stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, spec):
        if self.proc is None:
            self._start()
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self._read_line(self.per_call_seconds)
        if not line:
            if line == "":  # end of output: the worker died in this call
                code = self.proc.wait()
                self.proc = None
                return "crash", f"worker exited with {code}"
            self._stop()
            return "hang", f"> {self.per_call_seconds} s"
        verdict = json.loads(line)
        return verdict["outcome"], verdict["detail"]

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="how many calls to fuzz")
    parser.add_argument("--seed", type=int, default=0, help="seed of the spec generator")
    parser.add_argument("--spec", help="replay one JSON spec in this process and print its verdict")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--show", type=int, default=5, help="examples printed per failing outcome")
    parser.add_argument("--per-call-seconds", type=float, default=PER_CALL_SECONDS,
                        help="a call running longer counts as a hang")
    args = parser.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    if args.spec:
        print(classify(json.loads(args.spec)))
        return 0
    rng = random.Random(args.seed)
    worker = Worker(args.per_call_seconds)
    counts = {k: 0 for k in ("ok", "refused", "unclear", "wrong", "crash", "hang")}
    examples = {}
    start = time.time()
    for i in range(args.calls):
        spec = draw_spec(RandomDraw(rng))
        outcome, detail = worker.run(spec)
        if outcome == "ok" and detail.startswith("refused"):
            counts["refused"] += 1
        else:
            counts[outcome] += 1
        if outcome not in ("ok",):
            examples.setdefault(outcome, []).append((spec, detail))
        if (i + 1) % 1000 == 0:
            print(f"  {i + 1} calls, {time.time() - start:.0f} s: {counts}", file=sys.stderr, flush=True)
    worker.close()
    print(f"calls fuzzed: {args.calls} (seed {args.seed}, {time.time() - start:.0f} s)")
    print(f"  succeeded and matched the reference: {counts['ok']}")
    print(f"  refused with an error naming an argument: {counts['refused']}")
    print(f"crashes: {counts['crash']}")
    print(f"hangs (> {args.per_call_seconds:g} s): {counts['hang']}")
    print(f"unclear errors: {counts['unclear']}")
    print(f"silent wrong answers: {counts['wrong']}")
    for outcome, items in examples.items():
        for spec, detail in items[: args.show]:
            print(f"[{outcome}] {detail}\n    {json.dumps(spec)}")
    return 0 if counts["crash"] + counts["hang"] + counts["unclear"] + counts["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
