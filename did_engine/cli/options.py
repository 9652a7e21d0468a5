"""argparse for the did-engine commands: options generated from the config dataclasses, the
shared model and sampler options, help that states defaults, one-line errors.

Why a small generator rather than a library: the commands' option names, defaults, --x /
--no-x flags, help text and one-line errors (exit status 2) are a public interface that must
stay as it is. tyro derives its own spellings (and nests by dataclass), simple_parsing and
HfArgumentParser bring their own conventions, and HfArgumentParser would make transformers a
core dependency. The generator is the few lines below: each dataclass field whose metadata
holds ``did_engine.parsing.opt(...)`` becomes one option, its help text written beside the
field, so each option has one source of truth and the library never imports argparse.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

from did_engine.errors import UserError
from did_engine.modeling.loading import AUTO_DTYPE, DTYPES
from did_engine.parsing import comma_text, option_of


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless X is None / False / empty (nothing
    to say) or the help text already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, "") or re.search(r"\bdefault(:|\s|\))", text, re.IGNORECASE):
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``, exit status
    2, instead of the usage block (which runs to a dozen lines for ``generate``)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CLIError(UserError):
    """A user mistake in the options: printed as one line, exit status 2."""


def argument_type(parse):
    """An argparse type from a parser of ours: its UserError becomes argparse's one-line
    error with the message as it is (argparse would say only 'invalid value')."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


# ---------------------------------------------------------------------------------------
# Options generated from config dataclasses


_BUILTIN_TYPES = {"int": int, "float": float, "str": str}


def _flag(field) -> str:
    return option_of(field).flag or "--" + field.name.replace("_", "-")


def _dest(field) -> str:
    return _flag(field)[2:].replace("-", "_")


def _default(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def group(parser, title):
    """The argument group titled ``title`` (made on first use), so that several dataclasses
    can add options to one group; the parser itself when title is None."""
    if title is None:
        return parser
    groups = parser.__dict__.setdefault("_groups_by_title", {})
    if title not in groups:
        groups[title] = parser.add_argument_group(title)
    return groups[title]


def add_config_options(parser, cls, defaults: dict | None = None, *, only: tuple | None = None,
                       exclude: tuple = (), title: str | None = None) -> None:
    """One option per field of dataclass ``cls`` that carries ``opt`` metadata.

    bool fields become --x / --no-x; list, tuple and dict defaults are shown (and parsed
    back by the option's parser) as their option text, e.g. 4:0.9,L:0.1. ``defaults``
    replaces field defaults for this command (e.g. fewer samples for ablate). ``only`` limits
    the options to those fields and ``exclude`` leaves those out; ``title`` puts them in that
    group instead of their own (eval's --top-p in its samples group).
    """
    for field in dataclasses.fields(cls):
        option = option_of(field)
        if option is None or (only is not None and field.name not in only) or field.name in exclude:
            continue
        default = (defaults or {}).get(field.name, _default(field))
        kwargs = {"dest": _dest(field), "help": option.help}
        if option.choices:
            kwargs["choices"] = list(option.choices)
        if option.metavar:
            kwargs["metavar"] = option.metavar
        target = group(parser, title or option.group)
        if field.type == "bool":
            target.add_argument(_flag(field), action=argparse.BooleanOptionalAction, default=default, **kwargs)
            continue
        if option.parse is not None:
            kwargs["type"] = argument_type(option.parse)
        else:
            name = field.type.replace(" | None", "")
            if name not in _BUILTIN_TYPES:
                raise TypeError(f"{cls.__name__}.{field.name}: an option of type {field.type} needs parse=")
            kwargs["type"] = _BUILTIN_TYPES[name]
        if option.required or default is dataclasses.MISSING:
            kwargs["required"], default = True, None
        elif option.append:
            kwargs["action"], default = "append", None
        elif isinstance(default, (list, tuple, dict)):
            default = (option.show or comma_text)(default)  # argparse parses a str default with `type`
        target.add_argument(_flag(field), default=default, **kwargs)


def config_values(cls, args) -> dict:
    """{field name: value} of the options add_config_options(parser, cls) added; a repeated
    option's lists joined (none given: the field's default is left to the dataclass)."""
    values = {}
    for field in dataclasses.fields(cls):
        option = option_of(field)
        if option is None:
            continue
        value = getattr(args, _dest(field))
        if option.append:
            value = [item for occurrence in value or [] for item in occurrence]
            if not value:
                continue
        if isinstance(_default(field), tuple) and isinstance(value, list):
            value = tuple(value)
        values[field.name] = value
    return values


# ---------------------------------------------------------------------------------------
# Options without a config dataclass: the model to load, the refinement stages


DTYPE_HELP = ("model dtype; auto: bfloat16 where bf16 matmuls are fast (a GPU, a CPU with AMX: lscpu shows "
              "amx_bf16), else float32 (elsewhere a CPU emulates bf16, ~40x slower)")


def add_device_options(group, *, dtype_help: str = DTYPE_HELP) -> None:
    """--device and --dtype of the model (read with loading.resolve_dtype)."""
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    group.add_argument("--dtype", default=AUTO_DTYPE, choices=[AUTO_DTYPE, *sorted(DTYPES)], help=dtype_help)


def check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available here")


def parse_stage(text: str):
    """BLOCK:RATIO[:STEPS], BLOCK an int or 'global'; STEPS an int or 'auto' (one token per call)."""
    from did_engine.sampling import RefineStage

    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise CLIError(f"stage {text!r} must be BLOCK:RATIO[:STEPS], e.g. global:0.25:8")
    try:
        block = None if parts[0] in ("global", "L", "") else int(parts[0])
        ratio = float(parts[1])
        steps = 8 if len(parts) == 2 else (None if parts[2] in ("auto", "") else int(parts[2]))
        return RefineStage(block, ratio, steps)
    except UserError:
        raise
    except ValueError as exc:
        raise CLIError(f"bad stage {text!r}: {exc}") from None


def add_sampler_options(parser, exclude: tuple = ()) -> None:
    """The draft, refinement and sampling options (of `generate` and `eval`): SamplerConfig's
    (but the fields in ``exclude``, which the command adds elsewhere) and the refinement
    stages'; read them back with sampler_config_from_args."""
    from did_engine.sampling import SamplerConfig

    add_config_options(parser, SamplerConfig, exclude=exclude)
    # Hand-written: together these build SamplerConfig.stages (RefineStages), not one field each.
    refine = group(parser, "refinement")
    refine.add_argument("--stage", dest="stages", type=argument_type(parse_stage), action="append", default=None,
                        help="refinement stage BLOCK:RATIO[:STEPS] (repeatable; BLOCK 'global' = whole "
                             "sequence; STEPS model calls per block, 'auto' = one token per call). "
                             "Default: one stage global:0.25:8")
    refine.add_argument("--no-refine", action="store_true", help="draft only (plain BD3-LM sampling)")
    refine.add_argument("--reuse-context", action="store_true",
                        help="global stages: after one full forward, re-run only the remasked positions "
                             "against the stored K/V of the rest (approximate; a step then costs about "
                             "RATIO of a full one)")


def sampler_config_from_args(args):
    """The SamplerConfig that add_sampler_options' arguments describe."""
    from did_engine.sampling import RefineStage, SamplerConfig

    stages = [] if args.no_refine else (args.stages if args.stages is not None else [RefineStage(None, 0.25, 8)])
    if getattr(args, "reuse_context", False):
        stages = [dataclasses.replace(s, reuse_context=True) if s.block_size is None else s for s in stages]
    return SamplerConfig(length=args.length, stages=stages, **config_values(SamplerConfig, args))
