"""The build: what did_engine._C contains, the setup.py switches, and the standalone CMake build."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import did_engine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from did_engine.ops import OPS  # noqa: E402


def test_build_info_reports_cpu_kernels_and_openmp():
    info = did_engine.build_info()
    assert info["cpu"] is True
    assert sorted(info["cpu_ops"]) == sorted(OPS)
    assert info["openmp"] is True, "built without -fopenmp: at::parallel_for would run on one thread"
    assert info["omp_max_threads"] >= 1 and info["num_threads"] == torch.get_num_threads()
    assert info["torch_version"] == torch.__version__
    assert info["torch_version_at_build"] == torch.__version__, "rebuild did_engine against the running torch"
    assert info["cpu_capability"] in ("AVX2", "DEFAULT")
    if torch.version.cuda is None:
        assert info["cuda"] is False and info["cuda_ops"] == []
    if info["cuda"]:
        assert sorted(info["cuda_ops"]) == sorted(OPS) and info["cuda_arch_list"]


def test_c_module_is_pybind11_and_reports_the_build_the_kernels_got():
    """_C is a pybind11 module whose facts agree with what the dispatcher and torch see."""
    from did_engine import _C

    facts = _C.build_facts()
    assert _C.build_facts.__doc__.startswith("build_facts() -> dict")  # pybind11's signature line
    # The CPU_CAPABILITY macro _C was compiled with is the one in the flags setup.py recorded.
    assert f"-DCPU_CAPABILITY={facts['cpu_capability']}" in facts["cxx_flags"]
    assert facts["cuda"] == any(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"did_engine::{op}", "CUDA") for op in OPS)
    assert _C.omp_max_threads() >= 1


def test_each_backend_registers_every_op_in_one_file_beside_its_kernels():
    """csrc/ops.cpp holds the schemas; csrc/<backend>/ops_<backend> the TORCH_LIBRARY_IMPL."""
    csrc = os.path.join(ROOT, "csrc")
    registrations, schema_files = {}, []
    for directory, _, files in os.walk(csrc):
        for name in files:
            path = os.path.join(directory, name)
            text = open(path).read()
            for key in re.findall(r"^TORCH_LIBRARY_IMPL\(did_engine, (\w+), m\)", text, flags=re.M):
                registrations.setdefault(key, []).append(os.path.relpath(path, csrc))
            if re.search(r"^TORCH_LIBRARY\(did_engine, m\)", text, flags=re.M):
                schema_files.append(os.path.relpath(path, csrc))
    assert schema_files == ["ops.cpp"]
    assert registrations == {"CPU": ["cpu/ops_cpu.cpp"], "CUDA": ["cuda/ops_cuda.cu"]}
    for key, (path,) in registrations.items():
        text = open(os.path.join(csrc, path)).read()
        for op in OPS:
            assert f'm.impl("{op}"' in text, f"{path} registers no {key} kernel for {op}"


def test_every_op_has_a_schema_that_declares_mutation():
    schemas = {op: str(getattr(torch.ops.did_engine, op).default._schema) for op in OPS}
    assert "Tensor(a!) k_cache" in schemas["kv_commit"] and "Tensor(c!) cache_lens" in schemas["kv_commit"]
    assert "Tensor(a!) tokens" in schemas["snapshot_remask"] and "Tensor(b!) confidence" in schemas["snapshot_remask"]
    for op in ("block_decode_attention", "block_causal_attention"):
        assert "!" not in schemas[op], f"{op} must not mutate its inputs"


def test_forcing_cuda_on_a_cpu_torch_fails_with_a_clear_message():
    if torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "DID_ENGINE_CUDA": "1"}, timeout=120)
    assert proc.returncode != 0
    assert "DID_ENGINE_CUDA=1" in proc.stderr and "CPU build" in proc.stderr


def test_bad_switch_value_is_rejected():
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "DID_ENGINE_CPU_ARCH": "sse9"}, timeout=120)
    assert proc.returncode != 0 and "DID_ENGINE_CPU_ARCH" in proc.stderr


@pytest.mark.slow
def test_cmake_standalone_build_and_op_smoke(tmp_path):
    """CMakeLists.txt builds the op library through find_package(Torch); its driver passes."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    build = tmp_path / "build"
    configure = [cmake, "-S", ROOT, "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    subprocess.run(configure, check=True, capture_output=True, text=True, timeout=600)
    proc = subprocess.run([cmake, "--build", str(build), "-j", str(os.cpu_count() or 2)], capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    smoke = subprocess.run([str(build / "did_engine_op_smoke")], capture_output=True, text=True, timeout=300)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr[-4000:]
    assert "0 failed" in smoke.stdout
