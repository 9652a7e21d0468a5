"""The did-engine command line: help, one-line errors, a real (tiny) generation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from did_engine.cli import build_parser, main


def test_help_explains_every_generate_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    gen = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("generate"))
    for action in gen._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
            assert action.option_strings[-1] in text


def test_json_generation_with_a_preset(capsys):
    code = main(["generate", "--model", "preset:tiny", "--batch", "2", "--length", "16", "--stage", "global:0.5:2",
                 "--prompt-ids", "1,2,3", "--json", "--seed", "3"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 2 and len(out["tokens"][0]) == 16
    assert [row[:3] for row in out["tokens"]] == [[1, 2, 3]] * 2
    assert out["nfe"]["refine_1"]["forward"] == 2 and out["nfe"]["draft"]["decode"] == 13
    assert out["settings"]["seed"] == 3 and out["settings"]["stages"][0]["remask_ratio"] == 0.5


def test_reuse_context_option_applies_to_global_stages(capsys):
    code = main(["generate", "--model", "preset:tiny", "--length", "16", "--stage", "global:0.5:3", "--stage",
                 "4:0.25:2", "--reuse-context", "--json", "--seed", "1"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nfe"]["refine_1"] == {"forward": 1, "partial": 2}  # global: reused context
    assert "partial" not in out["nfe"]["refine_2"]  # a block-4 stage is left exact
    assert [s["reuse_context"] for s in out["settings"]["stages"]] == [True, False]


def test_text_output_shows_draft_refined_and_table(capsys):
    assert main(["generate", "--model", "preset:tiny", "--length", "12", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "draft:" in text and "refined:" in text and "rewritten" in text and "refine_1" in text


def run_cli(argv, capsys):
    """main(argv) in this process -> (exit status, stderr); argparse's errors exit too."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


TINY = ["generate", "--model", "preset:tiny", "--no-progress"]  # vocab 67 (mask 66), context 32


@pytest.mark.parametrize("extra,message", [
    (["--temperature", "nan"], "--temperature: expected a finite number"),
    (["--temperature", "inf"], "--temperature: expected a finite number"),
    (["--temperature", "-1"], "temperature must be in"),
    (["--top-p", "nan"], "--top-p: expected a finite number"),
    (["--threshold=-inf"], "--threshold: expected a finite number"),
    (["--length", "0"], "--length: expected a positive integer"),
    (["--length", "64"], "exceeds the model's context"),  # the default global stage, before any drafting
    (["--length", "64", "--method", "mdlm"], "exceeds the model's context"),
    (["--batch", "-1"], "--batch: expected a positive integer"),
    (["--eos-id", "70"], "eos_id 70 is outside the model's vocabulary"),
    (["--eos-id", "66"], "mask token"),
    (["--eos-id", "-1"], "--eos-id: expected an integer >= 0"),
    (["--prompt-ids", "1.5,2"], "--prompt-ids must be integers"),
    (["--prompt-ids", "67"], "prompt token ids"),
    (["--stage", "global:nan:2"], "remask_ratio must be a finite number"),
    (["--stage", "4:0.5:0"], "refine steps must be >= 1"),
    (["--stage", "4:0.5:2", "--length", "16", "--reuse-context", "--stage", "8:0.5"], None),  # fine: exits 0
])
def test_bad_sampler_arguments_give_one_line_and_exit_2(extra, message, capsys):
    code, err = run_cli(TINY + ["--length", "16"] + extra, capsys)
    if message is None:
        assert code == 0, err
        return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_a_checkpoint_that_fails_to_load_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"format": "did_engine", "config": {"vocab_size": ')  # truncated
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    code, err = run_cli(["generate", "--model", str(tmp_path)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "config.json" in lines[0], err


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """Only the user's mistakes become one-liners: a ValueError from inside (here planted
    in the sampler) propagates with its traceback."""
    import did_engine.sampling.sampler

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(did_engine.sampling.sampler, "generate", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(TINY + ["--length", "8"])


@pytest.mark.parametrize("argv,message", [
    (["generate", "--model", "/no/such/dir"], "is not a directory"),
    (["generate", "--model", "preset:huge"], "unknown preset"),
    (["generate", "--model", "preset:tiny", "--prompt", "hello"], "needs a tokenizer"),
    (["generate", "--model", "preset:tiny", "--top-p", "0"], "top_p"),
    (["generate", "--model", "preset:tiny", "--prompt-ids", "66"], "prompt token ids"),
])
def test_bad_arguments_give_one_line_errors(argv, message):
    proc = subprocess.run([sys.executable, "-m", "did_engine", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
