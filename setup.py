"""Build did_engine and its op library ``did_engine._C``.

Install torch first, then build against it without an isolated build environment
(an isolated one would download a multi-GB CUDA torch)::

    pip install torch
    pip install --no-build-isolation -e .

Environment switches (all optional):

    DID_ENGINE_CUDA=auto|1|0   compile csrc/cuda/*.cu. auto (default): only when torch is a
                               CUDA build and nvcc is found. 1: force (fails loudly if it
                               cannot). 0: CPU only.
    TORCH_CUDA_ARCH_LIST       CUDA architectures, default "8.0;9.0+PTX": kernels for A100 and
                               H100/H200, plus sm_90 PTX that newer GPUs compile at load.
    DID_ENGINE_CPU_ARCH        native (default) | avx2 | generic. native/avx2 compile the CPU
                               kernels with AVX2+FMA through at::vec when this machine has
                               them; generic gives portable scalar-vector code.
    DID_ENGINE_DEBUG=1         -O0 -g instead of -O3.
    MAX_JOBS                   parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - message for users only
    sys.exit(
        "did_engine builds against an installed PyTorch. Install torch first "
        "(e.g. `pip install torch`), then `pip install --no-build-isolation .`"
    )


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags and " f16c" in flags


def _want_cuda() -> bool:
    switch = os.environ.get("DID_ENGINE_CUDA", "auto").lower()
    has_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if switch in ("0", "off", "false", "no"):
        return False
    if switch in ("1", "on", "true", "yes"):
        if torch.version.cuda is None:
            sys.exit("DID_ENGINE_CUDA=1 but the installed torch is a CPU build (torch.version.cuda is None)")
        if not has_nvcc:
            sys.exit("DID_ENGINE_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    if switch != "auto":
        sys.exit(f"DID_ENGINE_CUDA must be auto, 1 or 0, got {switch!r}")
    return torch.version.cuda is not None and has_nvcc


def _cpu_arch_flags() -> tuple[str, list[str]]:
    arch = os.environ.get("DID_ENGINE_CPU_ARCH", "native").lower()
    if arch not in ("native", "avx2", "generic"):
        sys.exit(f"DID_ENGINE_CPU_ARCH must be native, avx2 or generic, got {arch!r}")
    if arch == "generic" or (arch == "native" and not _cpu_has_avx2()):
        return "DEFAULT", ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
    # at::vec picks its 256-bit implementation from these two macros.
    return "AVX2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def build_extension():
    with_cuda = _want_cuda()
    cpu_capability, arch_flags = _cpu_arch_flags()
    debug = os.environ.get("DID_ENGINE_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = opt + ["-fopenmp", "-Wall", "-Wno-unused-function"] + arch_flags
    define_macros = []
    extra_link = ["-fopenmp"]
    cuda_arch_list = None
    ext_cls = CppExtension
    extra_compile_args = {"cxx": cxx_flags}
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        cuda_arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        define_macros.append(("DID_ENGINE_WITH_CUDA", "1"))
        # C++20 like torch's own extension default: torch >= 2.13 headers need it, and nvcc 13
        # misparses ATen headers (List_inl.h) in C++17 mode with torch 2.11.
        extra_compile_args["nvcc"] = opt + [
            "-std=c++20",
            "--expt-relaxed-constexpr",
            "--use_fast_math",
            "-lineinfo",
        ]
        ext_cls = CUDAExtension

    config = {
        "cuda": with_cuda,
        "cuda_arch_list": cuda_arch_list,
        "cuda_version": torch.version.cuda if with_cuda else None,
        "cpu_capability": cpu_capability,
        "debug": debug,
        "torch_version_at_build": torch.__version__,
        "cxx_flags": cxx_flags,
    }
    with open(os.path.join(ROOT, "did_engine", "_build_config.json"), "w") as f:
        json.dump(config, f, indent=2)

    return ext_cls(
        name="did_engine._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link,
    )


if __name__ == "__main__":
    if shutil.which("ninja") is None:
        print("did_engine: ninja not found, falling back to a slower serial build", file=sys.stderr)
    setup(
        ext_modules=[build_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
        package_data={"did_engine": ["_build_config.json"]},
    )
