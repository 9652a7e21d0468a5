"""DDP through torchrun: 2 CPU processes (gloo) keep identical weights and compute the loss
of single-process training on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from support import REPO_DIR as REPO
from support.training_data import make_dataset, subprocess_env

# Each rank trains, then dumps its own weights: the check that ranks agree must not rely on
# rank 0's checkpoint.
WORKER = """
import os, sys
from safetensors.torch import save_file
from did_engine.training import Trainer, TrainConfig
cfg = TrainConfig.from_json(__import__("json").loads(sys.argv[1]))
trainer = Trainer(cfg)
trainer.fit()
rank = int(os.environ.get("RANK", "0"))
save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()},
          os.path.join(cfg.out, f"weights_rank{rank}.safetensors"))
"""


def _config(data, out):
    return {"data": data, "out": str(out), "model": "preset:tiny", "max_steps": 4, "batch_size": 8, "lr": 3e-3,
            "warmup_steps": 1, "log_every": 1, "save_every": 4, "eval_every": 0, "eval_batches": 1,
            "progress": False, "plot": False, "dropout": 0.0, "block_sizes": {"4": 0.5, "L": 0.5}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_torchrun_two_cpu_processes_match_single_process_training(tmp_path):
    data = make_dataset(tmp_path / "d")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**subprocess_env(), "PYTHONPATH": REPO}  # thread count left to torchrun (ranks share the cores)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(worker), json.dumps(_config(data, ddp))]
    res = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    assert "2 process(es)" in res.stderr.decode()
    subprocess.run([sys.executable, str(worker), json.dumps(_config(data, single))], env=env, check=True,
                   capture_output=True, timeout=300)

    r0, r1 = (load_file(str(ddp / f"weights_rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP keeps the replicas identical, bit for bit

    l_ddp, l_single = _losses(ddp), _losses(single)
    assert len(l_ddp) == len(l_single) == 4
    for a, b in zip(l_ddp, l_single):  # same global batch, same noise: the same loss up to rounding
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (l_ddp, l_single)
    assert l_ddp[-1] < l_ddp[0]
    w = load_file(str(single / "weights_rank0.safetensors"))
    assert max((r0[k] - w[k]).abs().max().item() for k in w) < 1e-4
