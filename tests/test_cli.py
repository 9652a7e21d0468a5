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
