"""Running an evaluation: generate the samples (per-sample seeds, the rejection rule), judge
them, summarise; the validation NELBO of a prepared dataset."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch

from did_engine.data.format import TokenDataset
from did_engine.data.tokenizer import Tokenizer
from did_engine.diffusion import evaluate_nelbo
from did_engine.evaluation.config import EvalConfig, EvalError, sample_seed
from did_engine.evaluation.judge import Judge
from did_engine.evaluation.metrics import gen_ppl_summary, unigram_entropy
from did_engine.modeling.loading import vocabulary_mismatch


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


def generate_samples(model, tokenizer, config: EvalConfig, progress: bool = False) -> GenerationRun:
    """num_samples per seed, in batches, with per-sample generators; the rejection rule if set."""
    from did_engine.sampling import DiDSampler

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
            run.samples.append(Sample(s, i, ids, gen, tokenizer.decode(ids), unigram_entropy(gen), k, low))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return run


def validation_nelbo(model, data_dir: str, *, block_size: int, batch_size: int = 8, max_batches: int | None = None,
                     seed: int = 0) -> dict:
    """Validation NELBO perplexity of the prepared dataset in ``data_dir`` (did_engine.evaluate_nelbo)."""
    dataset = TokenDataset(data_dir, "validation")
    mismatch = vocabulary_mismatch(model, dataset.model_vocab_size - 1)  # the same rule as training's
    if mismatch:
        raise EvalError(f"{data_dir}: {mismatch}")
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


def text_tokenizer(model, model_spec: str, beside=None, tokenizer_path: str | None = None, data_dir: str | None = None):
    """The tokenizer that turns the model's ids into text for the judge: ``tokenizer_path``,
    else ``beside`` (the one beside the weights), else the ``data_dir`` dataset's; checked
    against the model's vocabulary."""
    tokenizer = None if tokenizer_path else beside
    if tokenizer_path is None and tokenizer is None and data_dir:
        candidate = os.path.join(data_dir, "tokenizer.json")
        tokenizer_path = candidate if os.path.isfile(candidate) else None
    if tokenizer_path is not None:
        if not os.path.isfile(tokenizer_path):
            raise EvalError(f"--tokenizer {tokenizer_path!r} is not a file")
        try:
            tokenizer = Tokenizer.from_file(tokenizer_path)
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise EvalError(f"--tokenizer {tokenizer_path!r} is not a tokenizers JSON file: {exc}") from None
    if tokenizer is None:
        raise EvalError(f"--model {model_spec} has no tokenizer.json, so its samples cannot be turned into text "
                        "for the judge: pass --tokenizer FILE")
    if tokenizer.vocab_size > model.config.vocab_size - 1:
        raise EvalError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model generates only "
                        f"{model.config.vocab_size - 1} (+ the mask): they do not belong together")
    return tokenizer
