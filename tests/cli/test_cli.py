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


# -- options generated from the config dataclasses -------------------------------------------


@pytest.mark.parametrize("argv,config_class,given", [
    (["train", "--data", "d"], "did_engine.training.config.TrainConfig", {"data": "d"}),
    (["data", "prepare", "--out", "o"], "did_engine.data.prepare.PrepareConfig", {"out": "o"}),
    (["ablate", "--model", "m", "--out", "o"], "did_engine.evaluation.ablation.AblationConfig", {}),
    (["eval", "--model", "m"], "did_engine.evaluation.judge.JudgeConfig", {}),
    (["eval", "--model", "m"], "did_engine.evaluation.config.RejectionRule", {}),
])
def test_generated_options_parse_back_to_the_dataclass_defaults(argv, config_class, given):
    """Every default (a dict, a tuple with L, a list of seeds ...) is shown as option text and
    parsed back by the option's own parser: with only the required options given, the
    command line describes the dataclass's default configuration."""
    import importlib

    from did_engine.cli.options import config_values

    module, name = config_class.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert cls(**config_values(cls, build_parser().parse_args(argv))) == cls(**given)


def test_eval_defaults_and_per_command_overrides():
    from did_engine.cli.options import config_values
    from did_engine.evaluation.config import EvalConfig

    for command, samples in (("eval", 32), ("ablate", 16)):
        argv = [command, "--model", "m"] + (["--out", "o"] if command == "ablate" else [])
        values = config_values(EvalConfig, build_parser().parse_args(argv))
        assert EvalConfig(**values) == EvalConfig(num_samples=samples)


def test_generated_bool_and_list_options():
    from did_engine.cli.options import config_values
    from did_engine.training.config import TrainConfig

    args = build_parser().parse_args(["train", "--data", "d", "--no-antithetic", "--clip-search",
                                      "--block-sizes", "4:0.5, L:0.5", "--clip", "4:0.2:0.9",
                                      "--clip-search-widths", "0.5 0.75"])
    cfg = TrainConfig(**config_values(TrainConfig, args))
    assert (cfg.antithetic, cfg.clip_search, cfg.resample) == (False, True, True)
    assert cfg.block_sizes == {4: 0.5, "L": 0.5} and cfg.clip == {4: [0.2, 0.9]}
    assert cfg.clip_search_widths == (0.5, 0.75)


@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "d", "--clip-search-widths", "0.5,wide"], "--clip-search-widths must be numbers"),
    (["train", "--data", "d", "--block-sizes", "4"], "must be SIZE:PROB"),
    (["ablate", "--model", "m", "--out", "o", "--refine-blocks", "4,huge"], "refine blocks are integers or L"),
    (["eval", "--model", "m", "--seeds", ","], "give at least one seed"),
])
def test_generated_options_give_one_line_errors(argv, message, capsys):
    code, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err


@pytest.mark.parametrize("command", [["train"], ["data", "prepare"]])
def test_help_explains_every_generated_option(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices[command[0]]
    if len(command) == 2:
        sub = sub._subparsers._group_actions[0].choices[command[1]]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
            assert action.option_strings[-1] in text


def test_the_package_never_imports_the_cli():
    """The CLI is on top: importing the library (every module but cli/ and __main__) loads
    no did_engine.cli module."""
    import os

    import did_engine

    root = os.path.dirname(did_engine.__file__)
    modules = []
    for folder, _, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        if rel.split(os.sep)[0] in ("cli", "__pycache__", "pretrained"):
            continue
        for name in files:
            if name.endswith(".py") and name != "__main__.py":
                parts = ["did_engine"] + ([] if rel == "." else rel.split(os.sep))
                modules.append(".".join(parts + ([] if name == "__init__.py" else [name[:-3]])))
    code = ("import sys, importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
            + "print(sorted(m for m in sys.modules if m.startswith('did_engine.cli')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_every_sampler_option_reaches_its_samplerconfig_field(command):
    """The generated sampler options (eval's --top-p / --temperature in its samples group) set
    the SamplerConfig fields they name, and with none given the defaults are SamplerConfig's."""
    from did_engine.cli.options import sampler_config_from_args
    from did_engine.sampling import RefineStage, SamplerConfig

    base = [command] + (["--model", "m"] if command == "eval" else [])
    given = dict(block_size=7, strategy="threshold", tokens_per_step=3, threshold=0.75, min_tokens_per_step=2,
                 remask_policy="random", method="mdlm", mdlm_steps=5, top_p=0.5, temperature=0.0, eos_id=11,
                 stop_at_eos=True)
    argv = base + ["--block-size", "7", "--strategy", "threshold", "--tokens-per-step", "3", "--threshold", "0.75",
                   "--min-tokens-per-step", "2", "--policy", "random", "--method", "mdlm", "--mdlm-steps", "5",
                   "--top-p", "0.5", "--temperature", "0", "--eos-id", "11", "--stop-at-eos", "--length", "9",
                   "--no-refine"]
    assert sampler_config_from_args(build_parser().parse_args(argv)) == SamplerConfig(length=9, **given)
    default = sampler_config_from_args(build_parser().parse_args(base))
    assert default == SamplerConfig(stages=[RefineStage(None, 0.25, 8)])


def test_min_tokens_per_step_reaches_the_sampler_and_is_refused_with_other_strategies(capsys):
    from did_engine.cli.options import sampler_config_from_args

    args = build_parser().parse_args(["generate", "--strategy", "threshold", "--min-tokens-per-step", "3"])
    cfg = sampler_config_from_args(args)
    assert (cfg.strategy, cfg.min_tokens_per_step) == ("threshold", 3)
    assert sampler_config_from_args(build_parser().parse_args(["generate"])).min_tokens_per_step == 1
    assert main(["generate", "--strategy", "topk", "--min-tokens-per-step", "2", "--length", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "min_tokens_per_step" in err[0]
