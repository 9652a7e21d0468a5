"""`did-engine train`: mix-scale block diffusion training; its options are TrainConfig's fields.

    did-engine train --data DIR --out RUN [options]
    torchrun --nproc_per_node=N -m did_engine train --data DIR --out RUN ...   DDP
"""

from __future__ import annotations

import json
import os

from did_engine.cli.options import HelpFormatter, add_config_options, config_values
from did_engine.training.config import TrainConfig
from did_engine.training.trainer import train

DESCRIPTION = ("Train (or fine-tune) a block diffusion LM with mix-scale block sizes: each sequence draws its "
               "block size (default 4 with p 0.9, the whole sequence with p 0.1), the vectorised cat(x_t, x_0) "
               "mask, the NELBO of the log-linear schedule with per-size noise clipping. Checkpoints are atomic "
               "and resume exactly; run under `torchrun --nproc_per_node=N -m did_engine train` for DDP.")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="mix-scale block diffusion training (DDP under torchrun)",
                              description=DESCRIPTION, formatter_class=HelpFormatter)
    add_config_options(p, TrainConfig)
    p.set_defaults(run=cmd_train)


def config_from_args(args) -> TrainConfig:
    return TrainConfig(**config_values(TrainConfig, args))


def cmd_train(args) -> int:
    cfg = config_from_args(args)
    cfg.check()  # what can be checked before the data is opened
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line from rank 0
        print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}))
    return 0
