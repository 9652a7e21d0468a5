"""What the compiled op library contains: ``did_engine.build_info()``."""

from __future__ import annotations

import json
import os

import torch

_OPS = ("block_decode_attention", "kv_commit", "block_causal_attention", "snapshot_remask")


def _kernels_for(dispatch_key: str) -> list[str]:
    return [op for op in _OPS if torch._C._dispatch_has_kernel_for_dispatch_key(f"did_engine::{op}", dispatch_key)]


def build_info() -> dict:
    """Report how ``did_engine._C`` was built and what it registered.

    Keys: ``version``, ``cpu`` / ``cuda`` (whether kernels for that device were compiled),
    ``cpu_capability`` (AVX2 or DEFAULT vector code), ``cuda_arch_list``, ``cuda_version``,
    ``torch_version`` (running) and ``torch_version_at_build``, ``openmp`` (compiled with
    OpenMP), ``omp_max_threads`` and ``num_threads`` (ATen's intra-op threads now),
    ``cpu_ops`` / ``cuda_ops`` (ops with a kernel for that device), ``debug``.
    """
    from did_engine import __version__

    path = os.path.join(os.path.dirname(__file__), "_build_config.json")
    config = {}
    if os.path.exists(path):
        with open(path) as f:
            config = json.load(f)
    openmp, omp_threads, num_threads, cuda_compiled = torch.ops.did_engine._build_flags()
    cpu_ops, cuda_ops = _kernels_for("CPU"), _kernels_for("CUDA")
    return {
        "version": __version__,
        "cpu": bool(cpu_ops),
        "cuda": bool(cuda_compiled),
        "cpu_capability": config.get("cpu_capability"),
        "cuda_arch_list": config.get("cuda_arch_list"),
        "cuda_version": config.get("cuda_version"),
        "torch_version": torch.__version__,
        "torch_version_at_build": config.get("torch_version_at_build"),
        "openmp": bool(openmp),
        "omp_max_threads": omp_threads,
        "num_threads": num_threads,
        "cpu_ops": cpu_ops,
        "cuda_ops": cuda_ops,
        "debug": config.get("debug"),
    }
