"""The ``did-engine`` command line, on top of the library (nothing in did_engine imports it).

    did-engine generate [--model PATH] [options]   draft-then-refine generation (default: the embedded model)
    did-engine eval --model PATH [options]          Gen PPL under an external judge, entropy, NFE, speed
    did-engine ablate --model PATH --out DIR        the DiD ablations and the quality-speed frontier
    did-engine train --data DIR --out RUN           mix-scale training (torchrun -m did_engine train: DDP)
    did-engine data prepare --out DIR [options]     build a token dataset (corpus, tokenizer, splits)
    did-engine info                                 what the compiled op library contains

One module per command (generate.py, evaluate.py, ablate.py, train.py, data.py), each with
add_parser(subparsers) setting run=function(args) -> exit status; options.py generates the
options of the config dataclasses. Run ``did-engine COMMAND --help`` for every option.
"""

from __future__ import annotations

import json
import sys

from did_engine.cli import ablate, data, evaluate, generate, train
from did_engine.cli.options import ArgumentParser
from did_engine.errors import UserError

def cmd_info(args) -> int:
    import did_engine

    print(json.dumps(did_engine.build_info(), indent=2))
    return 0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="did-engine", description="Block diffusion LMs with the DiD sampler.")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    sub.add_parser("info", help="print did_engine.build_info() as JSON").set_defaults(run=cmd_info)
    for command in (data, train, evaluate, ablate):
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as exc:  # only the user's mistakes: a bug keeps its traceback
        print(f"did-engine: error: {exc}", file=sys.stderr)
        return 2
