"""What the compiled op library contains: ``did_engine.build_info()``."""

from __future__ import annotations

import torch

from did_engine import _C
from did_engine.ops import OPS


def _kernels_for(dispatch_key: str) -> list[str]:
    return [op for op in OPS if torch._C._dispatch_has_kernel_for_dispatch_key(f"did_engine::{op}", dispatch_key)]


def build_info() -> dict:
    """Report how ``did_engine._C`` was built and what it registered.

    Build facts, compiled into ``did_engine._C``: ``cpu_capability`` (AVX2 or DEFAULT vector
    code), ``cuda`` (CUDA kernels compiled in), ``cuda_arch_list``, ``cuda_version``,
    ``openmp`` (compiled with OpenMP), ``compiler``, ``cxx_flags``, ``nvcc_flags``,
    ``debug``, ``torch_version_at_build``. Now: ``version``, ``torch_version`` (running),
    ``omp_max_threads`` and ``num_threads`` (ATen's intra-op threads), ``cpu`` and
    ``cpu_ops`` / ``cuda_ops`` (ops with a kernel registered for that device).
    """
    from did_engine import __version__

    facts = _C.build_facts()
    cpu_ops, cuda_ops = _kernels_for("CPU"), _kernels_for("CUDA")
    return {
        "version": __version__,
        "cpu": bool(cpu_ops),
        "cuda": facts["cuda"],
        "cpu_capability": facts["cpu_capability"],
        "cuda_arch_list": facts["cuda_arch_list"],
        "cuda_version": facts["cuda_version"],
        "torch_version": torch.__version__,
        "torch_version_at_build": facts["torch_version_at_build"],
        "openmp": facts["openmp"],
        "omp_max_threads": _C.omp_max_threads(),
        "num_threads": torch.get_num_threads(),
        "cpu_ops": cpu_ops,
        "cuda_ops": cuda_ops,
        "debug": facts["debug"],
        "compiler": facts["compiler"],
        "cxx_flags": facts["cxx_flags"],
        "nvcc_flags": facts["nvcc_flags"],
    }
