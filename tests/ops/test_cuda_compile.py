"""Every CUDA source compiles with nvcc, for sm_80 and sm_90, against the installed torch.

This runs on CPU-only machines too: it only compiles (``nvcc -c``), it never links or
runs. It uses the include directories and defines that ``torch.utils.cpp_extension`` uses
for a CUDA extension, plus the nvcc flags of ``setup.py``. One nvcc call per file covers
both architectures. Warnings are fine; any error fails the test. It is skipped only when
nvcc cannot be found.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
CUDA_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
from did_engine.ops import OPS  # noqa: E402

# setup.py's extra_compile_args["nvcc"] (release build); keep the two in sync.
SETUP_NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "--use_fast_math", "-lineinfo"]
# setup.py's default TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX": sm_80 and sm_90 kernels, sm_90 PTX.
ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]"]
COMPILE_TIMEOUT_S = 900


def _find_nvcc() -> str | None:
    candidates = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH): cannot compile-check csrc/cuda/*.cu"
)


def nvcc_command(source: Path, obj: Path) -> list[str]:
    """The nvcc command torch.utils.cpp_extension would run for `source` (compile only)."""
    torch_includes = cpp_extension.include_paths()  # torch/include, torch/include/torch/csrc/api/include
    system_includes = torch_includes + [sysconfig.get_path("include")]
    defines = [
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DDID_ENGINE_WITH_CUDA=1",
    ]
    # CPU wheels of torch ship the c10/cuda headers but not the CMake-generated
    # c10/cuda/impl/cuda_cmake_macros.h (it only defines C10_CUDA_BUILD_SHARED_LIBS); c10
    # provides this switch for builds without it. CUDA wheels have the file.
    if not (Path(torch_includes[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    command = [NVCC, "-c", str(source), "-o", str(obj)]
    command += list(cpp_extension.COMMON_NVCC_FLAGS) + ["--compiler-options", "-fPIC"]
    command += SETUP_NVCC_FLAGS + ARCH_FLAGS + defines
    command += [f"-I{CUDA_DIR.parent}"]
    for include in system_includes:
        command += ["-isystem", include]
    return command


def test_cuda_sources_exist():
    assert CUDA_SOURCES, f"no .cu files in {CUDA_DIR}"


def test_every_op_has_a_cuda_kernel():
    """Each op of the registry is implemented for the CUDA dispatch key in csrc/cuda."""
    text = "\n".join(path.read_text() for path in CUDA_SOURCES)
    assert "TORCH_LIBRARY_IMPL(did_engine, CUDA, m)" in text
    for op in OPS:
        assert re.search(rf'm\.impl\("{op}"', text), f"no CUDA kernel registered for did_engine::{op}"


@pytest.fixture(scope="module")
def object_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cuda_objects")


@needs_nvcc
@pytest.mark.slow  # ~85 s for all files on 2 cores; runs by default, deselect with -m "not slow"
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_cuda_source_compiles(source: Path, object_dir: Path):
    obj = object_dir / (source.stem + ".o")
    command = nvcc_command(source, obj)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, cwd=ROOT)
    elapsed = time.perf_counter() - start
    output = (result.stdout + result.stderr)[-20000:]
    assert result.returncode == 0, (
        f"nvcc failed on {source.name} (exit {result.returncode}, {elapsed:.0f} s)\n"
        f"command: {' '.join(command)}\n{output}"
    )
    assert obj.is_file() and obj.stat().st_size > 0, f"nvcc wrote no object for {source.name}"


@needs_nvcc
@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) not found")
def test_cuda_objects_resolve_each_other(object_dir: Path):
    """Every did_engine symbol an object needs (ops_cuda.cu calls the launchers declared in
    launch.h) is defined by one of the objects: declarations and definitions agree."""
    objects = [object_dir / (source.stem + ".o") for source in CUDA_SOURCES]
    if not all(obj.is_file() for obj in objects):
        pytest.skip("not every CUDA source compiled (see test_cuda_source_compiles)")
    defined, needed = set(), {}
    for obj in objects:
        nm = ["nm", "-C", str(obj)]
        undefined = subprocess.run(nm + ["--undefined-only"], capture_output=True, text=True, check=True).stdout
        for line in undefined.splitlines():
            name = line.split(maxsplit=1)[1] if len(line.split(maxsplit=1)) == 2 else ""
            if name.startswith("did_engine::"):
                needed.setdefault(name, obj.name)
        listing = subprocess.run(nm + ["--defined-only"], capture_output=True, text=True, check=True).stdout
        for line in listing.splitlines():
            parts = line.split(maxsplit=2)
            if len(parts) == 3 and parts[1] in "TtWw":
                defined.add(parts[2])
    missing = {name: obj for name, obj in needed.items() if name not in defined}
    assert not missing, f"undefined did_engine symbols: {missing}"
