"""Option metadata for config dataclass fields, and the value parsers they name.

A config dataclass (TrainConfig, PrepareConfig, EvalConfig, ...) is the one source of truth
for its command-line options: each field that is an option carries ``opt(...)`` in its
metadata, with the help text beside the field. The command line (cli/options.py) turns
those fields into argparse options; the library itself never imports the CLI.

The parsers take the option's text and return its value; they raise UserError (one line,
exit status 2 on the command line) for text that does not parse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from did_engine.errors import UserError


@dataclass(frozen=True)
class Option:
    """How a config field appears on the command line (see ``opt``)."""

    help: str
    group: str | None = None
    flag: str | None = None  # default: --FIELD-NAME
    parse: Callable[[str], Any] | None = None  # default: from the field's type (int, float, str, bool)
    choices: tuple | None = None
    metavar: str | None = None
    show: Callable[[Any], str] | None = None  # the default as option text, for --help (default: comma list)
    required: bool = False
    append: bool = False  # repeatable; the lists of every occurrence are joined


def opt(help: str, **how) -> dict:
    """Field metadata that makes a config field a command-line option:
    ``lr: float = field(default=3e-4, metadata=opt("peak learning rate", group="optimisation"))``.
    Keywords are those of :class:`Option`."""
    return {"option": Option(help, **how)}


def option_of(field) -> Option | None:
    """The Option of a dataclass field, or None when the field is not an option."""
    return field.metadata.get("option")


_NOUNS = {int: "integers", float: "numbers", str: "names"}


def parse_list(text: str, item: Callable[[str], Any] = str, what: str = "the list", noun: str | None = None,
               *, spaces: bool = True) -> list:
    """'a,b c' -> [item('a'), item('b'), item('c')]: items separated by commas and/or spaces
    (with ``spaces=False`` by commas only, for items that may hold spaces).

    An item that does not parse is one UserError: "<what> must be <noun> separated by
    commas, got <text>"; a UserError raised by ``item`` itself passes through unchanged.
    """
    try:
        parts = text.replace(",", " ").split() if spaces else filter(None, (p.strip() for p in text.split(",")))
        return [item(t) for t in parts]
    except UserError:
        raise
    except ValueError:
        raise UserError(f"{what} must be {noun or _NOUNS.get(item, 'values')} separated by commas, "
                        f"got {text!r}") from None


def token_ids(text: str) -> list:
    """--prompt-ids: token ids separated by commas, e.g. 50256,464."""
    return parse_list(text, int, "--prompt-ids")


def _int_at_least(minimum: int, what: str):
    """A parser: an integer >= minimum, else UserError "expected <what>, got <text>"."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise UserError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise UserError(f"expected {what}, got {value}")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def finite_float(text: str) -> float:
    """A float that is not NaN or infinite (a NaN temperature would make every token 0)."""
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise UserError(f"expected a finite number, got {text!r}")
    return value


def comma_text(value) -> str:
    """A list, tuple or dict default as the option text that parses back to it: 'a,b',
    '4:0.9,L:0.1'."""
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


__all__ = ["Option", "comma_text", "finite_float", "nonnegative_int", "opt", "option_of", "parse_list",
           "positive_int", "token_ids"]
