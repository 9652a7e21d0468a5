"""Training the Llama family: adapting a causal LM (a tiny random Llama written by
transformers over the byte vocabulary: a mask row is added, logit shift on) and mix-scale
training from an SDAR-style block diffusion checkpoint; exact resume; the final model loads
with load_model and generates through the CLI; a dataset of another vocabulary is refused."""

from __future__ import annotations

import json
import os

import pytest
import torch

from did_engine import LlamaBlockDiffusionLM, load_model
from did_engine.cli import main
from did_engine.data.format import TokenDataset, wrap_documents, write_manifest, write_split
from did_engine.diffusion import evaluate_nelbo
from did_engine.errors import UserError
from did_engine.training.config import TrainConfig, TrainConfigError
from did_engine.training.state import optimizer_to_flat
from did_engine.training.trainer import Trainer
from support.training_data import EOS, TEXT, make_dataset

transformers = pytest.importorskip("transformers", reason="the Llama directories are written with transformers")

from support.hf_llama import byte_tokenizer, write_byte_llama  # noqa: E402

SDAR_MASK = 257  # <|MASK|>, added to the byte tokenizer of the SDAR-style directory


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory) -> str:
    """The byte dataset (257 tokens), with the byte tokenizer as its tokenizer.json."""
    path = make_dataset(tmp_path_factory.mktemp("data") / "bytes")
    byte_tokenizer().save(os.path.join(path, "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def sdar_data(tmp_path_factory) -> str:
    """The same bytes, tokenised with the SDAR directory's tokenizer (258 tokens, the last
    one <|MASK|>, which text never produces)."""
    path = str(tmp_path_factory.mktemp("data") / "sdar")
    os.makedirs(path)
    seqs = wrap_documents([list(line.encode()) for line in TEXT.splitlines() if line], 32, EOS, EOS)
    splits = {"train": write_split(path, "train", seqs[4:]), "validation": write_split(path, "validation", seqs[:4])}
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens(["<|MASK|>"])
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    write_manifest(path, seq_len=32, tokenizer={"kind": "bpe", "vocab_size": 258, "bos_id": EOS, "eos_id": EOS},
                   splits=splits)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return write_byte_llama(tmp_path_factory.mktemp("models") / "llama", "llama")


@pytest.fixture(scope="module")
def sdar_dir(tmp_path_factory) -> str:
    return write_byte_llama(tmp_path_factory.mktemp("models") / "sdar", "qwen3", model_type="sdar")


def _config(data, out, model, **overrides) -> TrainConfig:
    cfg = dict(data=data, out=str(out), model=model, batch_size=8, max_steps=6, lr=3e-3, warmup_steps=0,
               log_every=1, save_every=3, keep_checkpoints=10, eval_batches=1, progress=False, plot=False, ema=0.9,
               block_sizes={4: 0.5, "L": 0.5})
    return TrainConfig(**{**cfg, **overrides})


def _nelbo(model, data) -> float:
    return evaluate_nelbo(model, TokenDataset(data, "train"), block_size=4, batch_size=8, max_batches=2,
                          generator=torch.Generator().manual_seed(0))["nelbo"]


@pytest.mark.parametrize("kind", ["llama", "sdar"])
def test_a_few_steps_lower_the_nelbo(kind, llama_dir, sdar_dir, byte_data, sdar_data, tmp_path):
    directory, data = (llama_dir, byte_data) if kind == "llama" else (sdar_dir, sdar_data)
    before = load_model(directory)
    assert before.config.logit_shift == (kind == "llama")
    assert before.mask_id == (257 if kind == "llama" else SDAR_MASK) and before.config.vocab_size == 258
    trainer = Trainer(_config(data, tmp_path / "run", directory, max_steps=12, ema=0.0))
    result = trainer.fit()
    after = load_model(result["final"])
    nelbo_before, nelbo_after = _nelbo(before, data), _nelbo(after, data)
    print(f"{kind}: NELBO on the training text {nelbo_before:.3f} -> {nelbo_after:.3f} nats/token")
    assert nelbo_after < 0.8 * nelbo_before
    assert type(after) is LlamaBlockDiffusionLM and after.config.extra["train_steps"] == 12
    assert after.config.logit_shift == before.config.logit_shift and after.mask_id == before.mask_id


def _run_state(trainer: Trainer) -> dict:
    out = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    out.update(trainer.ema.state_dict())
    out.update(optimizer_to_flat(trainer.optimizer)[0])
    return out


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(llama_dir, byte_data, tmp_path):
    whole = Trainer(_config(byte_data, tmp_path / "whole", llama_dir))
    whole.fit()
    Trainer(_config(byte_data, tmp_path / "halves", llama_dir, max_steps=3)).fit()
    second = Trainer(_config(byte_data, tmp_path / "halves", llama_dir))
    assert second.maybe_resume().endswith("step_00000003")
    second.fit()
    a, b = _run_state(whole), _run_state(second)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:4]}"
    with open(tmp_path / "whole" / "metrics.jsonl") as f1, open(tmp_path / "halves" / "metrics.jsonl") as f2:
        assert [json.loads(line)["loss"] for line in f1 if '"loss"' in line] == \
            [json.loads(line)["loss"] for line in f2 if '"loss"' in line]


def test_the_cli_trains_it_and_the_final_model_loads_and_generates_text(llama_dir, byte_data, tmp_path, capsys):
    assert main(["train", "--model", llama_dir, "--data", byte_data, "--out", str(tmp_path / "run"), "--max-steps", "3",
                 "--batch-size", "8", "--eval-batches", "1", "--no-progress", "--no-plot"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["final"]
    assert final == str(tmp_path / "run" / "final")
    model = load_model(final)
    assert type(model) is LlamaBlockDiffusionLM and model.config.extra["weights"] == "ema"
    with open(os.path.join(final, "config.json")) as f:
        assert json.load(f)["model_class"] == "LlamaBlockDiffusionLM"
    assert main(["generate", "--model", final, "--prompt", "And God", "--length", "20", "--json",
                 "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    tokens = out["tokens"][0]
    assert tokens[:8] == [EOS, *b"And God"] and all(0 <= t < 257 for t in tokens)
    assert out["text"][0] == byte_tokenizer().decode(tokens)


def test_a_dataset_of_another_vocabulary_is_refused_naming_both_sizes(sdar_dir, llama_dir, byte_data, tmp_path):
    with pytest.raises(TrainConfigError, match="257 tokens.*its tokenizer.json has 258"):
        Trainer(_config(byte_data, tmp_path / "bad", sdar_dir))
    with pytest.raises(UserError, match="LlamaBlockDiffusionLM has no dropout"):
        Trainer(_config(byte_data, tmp_path / "bad", llama_dir, dropout=0.1))
