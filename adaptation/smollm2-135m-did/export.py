"""Copy the newest checkpoint of run/ into the package as the embedded default's adapter.

    python adaptation/smollm2-135m-did/export.py [--checkpoint run/checkpoints/step_N]

Only the delta is copied (adapter_config.json, adapter.safetensors, tokenizer.json), and the
loss curve of run/metrics.jsonl is drawn into loss.png here; the model card beside the
adapter is written by hand from the metrics and the evaluations.
"""

from __future__ import annotations

import argparse
import os
import shutil

from did_engine.modeling.adapters import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, portable_config,
                                          read_adapter_config)
from did_engine.modeling.checkpoint import atomic_write_json
from did_engine.training.state import list_checkpoints
from did_engine.training.trainer import plot_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.join(HERE, "..", "..", "did_engine", "pretrained", "smollm2-135m-did")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a checkpoint directory (default: the newest under run/)")
    args = parser.parse_args()
    checkpoint = args.checkpoint or (list_checkpoints(os.path.join(HERE, "run")) or [None])[-1]
    if checkpoint is None:
        raise SystemExit("no checkpoint under run/: train first (train.sh)")
    meta = read_adapter_config(checkpoint)  # refuse anything that is not a delta checkpoint
    os.makedirs(PACKAGE_DIR, exist_ok=True)
    for name in (ADAPTER_WEIGHTS_NAME, "tokenizer.json"):
        tmp = os.path.join(PACKAGE_DIR, f".{name}.tmp")
        shutil.copyfile(os.path.join(checkpoint, name), tmp)
        os.replace(tmp, os.path.join(PACKAGE_DIR, name))
    atomic_write_json(os.path.join(PACKAGE_DIR, ADAPTER_CONFIG_NAME), {**meta, "config": portable_config(meta["config"])})
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "tokenizer.json"):
        os.chmod(os.path.join(PACKAGE_DIR, name), 0o644)  # package data: readable by whoever imports it
    print(f"exported {checkpoint} -> {os.path.normpath(PACKAGE_DIR)}")
    plot = plot_metrics(os.path.join(HERE, "run", "metrics.jsonl"), os.path.join(HERE, "loss.png"),
                        "SmolLM2-135M -> block diffusion (LoRA r16), did_engine train")
    if plot:
        print(f"loss curve: {os.path.relpath(plot)}")


if __name__ == "__main__":
    main()
