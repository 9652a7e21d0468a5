"""`did-engine generate` and `did-engine eval` with every kind of model the loader takes: a
Llama-family Hugging Face directory (written by transformers, a tokenizer built with
`tokenizers`), the same by hub name from an offline cache, and the BD3-LM fixture."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from did_engine import BlockDiffusionLM, LlamaBlockDiffusionLM, load_model
from did_engine.cli import main
from support import BD3LM_FIXTURE

transformers = pytest.importorskip("transformers", reason="the Llama directory is written with transformers")

from support.hf_llama import BYTES_EOS, write_byte_llama  # noqa: E402

PROMPT = "Shall I compare thee"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_byte_llama(tmp_path_factory.mktemp("llama") / "tiny-llama", "llama")


def generate_json(capsys, *argv) -> dict:
    assert main(["generate", *argv, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_from_a_llama_directory_decodes_through_its_tokenizer(llama_dir, capsys):
    out = generate_json(capsys, "--model", llama_dir, "--prompt", PROMPT, "--length", "24", "--batch", "2")
    prompt = [BYTES_EOS, *PROMPT.encode()]  # the tokenizer's BOS, then the bytes of the prompt
    model = load_model(llama_dir)
    assert isinstance(model, LlamaBlockDiffusionLM) and model.mask_id == 257 and model.config.logit_shift
    # The text is the tokens as transformers' tokenizer of the directory decodes them.
    reference = transformers.AutoTokenizer.from_pretrained(llama_dir)
    for tokens, text in zip(out["tokens"], out["text"]):
        assert tokens[: len(prompt)] == prompt and len(tokens) == 24
        assert all(0 <= t < 257 for t in tokens)  # never the mask (257)
        assert text == reference.decode(tokens, skip_special_tokens=True)
        assert text.startswith(PROMPT)


def test_generate_is_the_python_api_with_the_same_seed(llama_dir, capsys):
    from did_engine import SamplerConfig, generate

    out = generate_json(capsys, "--model", llama_dir, "--prompt-ids", "256,83,104", "--length", "16", "--seed", "5",
                        "--no-refine")
    model = load_model(llama_dir)
    result = generate(model, 1, prompt=torch.tensor([256, 83, 104]), generator=torch.Generator().manual_seed(5),
                      config=SamplerConfig(length=16, stages=[]))
    assert out["tokens"] == result.tokens.tolist()


def test_generate_by_hub_name_from_an_offline_cache(llama_dir, tmp_path, monkeypatch, capsys):
    hub = pytest.importorskip("huggingface_hub")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--tiny-llama"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(llama_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    by_name = generate_json(capsys, "--model", "someorg/tiny-llama", "--prompt", PROMPT, "--length", "24")
    by_path = generate_json(capsys, "--model", llama_dir, "--prompt", PROMPT, "--length", "24")
    assert by_name["tokens"] == by_path["tokens"] and by_name["text"] == by_path["text"]


def test_generate_from_the_bd3lm_fixture(capsys):
    out = generate_json(capsys, "--model", BD3LM_FIXTURE, "--prompt-ids", "1,2,3", "--length", "16", "--seed", "2")
    assert isinstance(load_model(BD3LM_FIXTURE), BlockDiffusionLM)
    assert out["tokens"][0][:3] == [1, 2, 3] and len(out["tokens"][0]) == 16
    assert all(0 <= t < 66 for t in out["tokens"][0])  # the mask (66) is never left behind
    assert "text" not in out  # BD3-LM's directory carries no tokenizer


def test_eval_of_a_llama_directory_judged_by_a_causal_lm(llama_dir, tmp_path, capsys):
    """The directory is a transformers causal LM too, so it can be its own judge."""
    code = main(["eval", "--model", llama_dir, "--judge", llama_dir, "--num-samples", "2", "--length", "16",
                 "--no-refine", "--keep-texts", "--json", "--no-progress", "--out", str(tmp_path / "report")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    samples = report["metrics"]["per_sample"]
    assert report["model"]["spec"] == llama_dir and len(samples) == 2
    assert all(s["text"] and s["ppl"] > 1.0 for s in samples)
    assert os.path.isfile(tmp_path / "report" / "eval.json")


def test_a_model_spec_that_names_nothing_is_one_line(tmp_path, capsys):
    try:
        code = main(["generate", "--model", str(tmp_path / "absent")])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not a directory or file" in err[0]
