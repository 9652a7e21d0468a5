"""bench/quality_vs_ar.py end to end on tiny random byte-level Llama models (the adapted
model, its base and the judge are transformers directories): the AR row is transformers'
own sampling with per-sample seeds, our rows are the sampler's, the prompts are held-out
documents."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from did_engine.data.tokenizer import Tokenizer
from did_engine.errors import UserError
from did_engine.evaluation.config import sample_seed
from did_engine.sampling import DiDSampler, RefineStage
from support import REPO_DIR

transformers = pytest.importorskip("transformers", reason="the AR row and the judge are transformers models")

from support.hf_llama import BYTES_EOS, write_byte_llama  # noqa: E402
from support.training_data import TEXT, make_dataset  # noqa: E402

sys.path.insert(0, os.path.join(REPO_DIR, "bench"))
import quality_vs_ar as qa  # noqa: E402

LENGTH = 20


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    return {"model": write_byte_llama(root / "model", "llama", seed=0),
            "judge": write_byte_llama(root / "judge", "llama", seed=1),
            "data": make_dataset(root / "data")}


def args_for(dirs, *extra):
    return qa.build_parser().parse_args(["--model", dirs["model"], "--judge", dirs["judge"], "--num-samples", "2",
                                         "--seeds", "0,3", "--length", str(LENGTH), "--no-progress", *extra])


def reference_ar_sample(hf, prompt, new_tokens, seed, top_p):
    """Nucleus sampling written out: the full forward each step (no cache), the smallest set
    of most likely tokens holding top_p of the mass, torch.multinomial on torch's global
    generator seeded with ``seed``, as transformers' sampling step draws."""
    torch.manual_seed(seed)
    ids = torch.tensor([prompt])
    for _ in range(new_tokens):
        probs = hf(ids).logits[0, -1].double().softmax(-1)
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more likely tokens
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[before < top_p]] = True
        kept = torch.where(keep, probs, 0.0).float()
        ids = torch.cat([ids, torch.multinomial(kept / kept.sum(), 1)[None]], 1)
    return ids[0].tolist()


def test_ar_row_is_transformers_sampling_with_per_sample_seeds(dirs):
    args = args_for(dirs)
    model, _ = qa.load_for_sampling(dirs["model"])
    tokenizer = Tokenizer.from_file(os.path.join(dirs["model"], "tokenizer.json"))
    hf = qa.load_base(qa.base_spec_of(model, dirs["model"], None), model, "cpu")
    prompts = [[BYTES_EOS]]
    with torch.inference_mode():
        row = qa.ar_samples(hf, tokenizer, prompts, qa.sample_jobs([0, 3], 3, 1), args)
        alone = qa.ar_samples(hf, tokenizer, prompts, [(3, 2, 0)], args)  # sample 2 of seed 3, on its own
    assert [len(s["ids"]) for s in row.samples] == [LENGTH] * 6
    assert all(s["ids"][0] == BYTES_EOS and len(s["generated"]) == LENGTH - 1 for s in row.samples)
    assert alone.samples[0]["ids"] == row.samples[-1]["ids"]  # same seed, same sample, whatever ran before
    assert len({tuple(s["ids"]) for s in row.samples}) == 6  # different seeds, different samples
    assert row.model_calls / row.row_tokens == 1.0
    # transformers' generate() draws what plain nucleus sampling draws: top_k off, no other processor.
    with torch.no_grad():
        for s in row.samples[:3]:
            want = reference_ar_sample(hf, [BYTES_EOS], LENGTH - 1, sample_seed(s["seed"], s["index"]), 0.9)
            assert s["ids"] == want


def test_rows_from_bos_end_to_end(dirs, capsys):
    args = args_for(dirs, "--variants", "fh,conf,did:0.25:2,did:0.5:3", "--batch-size", "3")
    report = qa.run(args)
    metrics = report["metrics"]
    assert list(metrics) == ["ar", "fh", "conf", "did:0.25:2", "did:0.5:3"]
    for m in metrics.values():
        assert m["samples"] == 4 and m["gen_ppl"] > 1.0 and m["entropy"] > 0.0 and m["seconds"] > 0.0
    # first-hitting fills one position per call; DiD adds its 2 refinement calls per sample batch
    assert metrics["fh"]["calls_per_token"] == pytest.approx(1.0, abs=0.1)
    assert metrics["did:0.25:2"]["calls_per_token"] > metrics["fh"]["calls_per_token"]
    # Each DiD row (refined from a copy of the draft's generators) is what the sampler
    # generates with its stage; its drafts are the fh row's.
    rows = {row.key: row for row in report["rows"]}
    model, _ = qa.load_for_sampling(dirs["model"])
    jobs = qa.sample_jobs(args.seeds, args.num_samples, 1)
    for key, ratio, steps in (("did:0.25:2", 0.25, 2), ("did:0.5:3", 0.5, 3)):
        config = qa.sampler_config("fh", args)
        config.stages = [RefineStage(None, ratio, steps)]
        for batch in qa.batches_of(jobs, args.batch_size):
            gens = [torch.Generator().manual_seed(sample_seed(s, i)) for s, i, _ in batch]
            result = DiDSampler(model, config).generate(len(batch), prompt=torch.tensor([[BYTES_EOS]] * len(batch)),
                                                        generator=gens)
            for (s, i, _), ids, draft in zip(batch, result.tokens.tolist(), result.draft_tokens.tolist()):
                k = jobs.index((s, i, 0))
                assert rows[key].samples[k]["ids"] == ids
                assert rows["fh"].samples[k]["ids"] == draft
    body, notes, texts = qa.report_markdown(report, keep_texts=1)
    assert "| base AR (transformers generate) |" in body and "`did:0.25:2` vs draft `fh`" in body
    assert "`did:0.25:2` vs base AR: Gen PPL" in body and texts.count("```text") == 5


def test_prompts_are_held_out_documents_continued_by_every_row(dirs):
    report = qa.run(args_for(dirs, "--prompts", "2", "--prompt-tokens", "6", "--data", dirs["data"],
                             "--variants", "fh"))
    documents = [list(line.encode()) for line in TEXT.splitlines() if line]
    want = [[BYTES_EOS] + documents[0][:6], [BYTES_EOS] + documents[1][:6]]
    assert report["prompts"] == want
    for row in report["rows"]:
        for s in row.samples:
            assert s["ids"][:7] == want[s["index"] % 2] and len(s["ids"]) == LENGTH


def test_bad_input_is_a_user_error(dirs, capsys):
    for bad in ("did:2:8", "did:0.5", "thr:x", "fh,fh", "nope", ""):
        with pytest.raises(UserError, match="--variants"):
            qa.parse_variants(bad)
    with pytest.raises(UserError, match="--prompts 3"):
        qa.run(args_for(dirs, "--prompts", "3", "--prompt-tokens", "6", "--data", dirs["data"]))
    assert qa.main(["--model", dirs["model"], "--judge", dirs["judge"], "--prompts", "2"]) == 2
    assert "--prompts N and --data DIR go together" in capsys.readouterr().err
