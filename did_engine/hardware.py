"""What the machine computes fastest: used to pick autocast and inference dtypes.

On Intel Xeons with AMX (``lscpu`` shows ``amx_bf16``) a bf16 matmul runs ~7x an fp32 one
(measured: ~2,100 against ~300 GFLOP/s); on CPUs without it (AVX2 EPYCs, most laptops)
oneDNN emulates bf16 and it is ~40x slower than fp32. GPUs of compute capability 8.0 and
up have bf16 tensor cores.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX bf16 tile units (Linux: the amx_bf16 flag of /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def fast_bf16(device) -> bool:
    """Whether bf16 matmuls on ``device`` are faster than fp32 ones."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_amx_bf16()
