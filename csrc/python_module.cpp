// did_engine._C, the Python module of the op library (pybind11, as bundled with torch).
//
// Loading it registers the ops (static initialisers of csrc/ops.cpp and each backend's
// registration file); they are reached through torch.ops.did_engine as custom ops, so
// torch.compile, opcheck and fake tensors see them. This module itself only reports how
// the library was built: did_engine.build_info() reads build_facts().
//
// Kept in its own file so the standalone CMake build (no Python) leaves it out.

#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

// Written by setup.py next to the build: the facts only setup.py knows (CUDA arch list,
// CUDA version, flags, the torch it built against).
#include "did_engine_build_config.h"

#define DID_ENGINE_STRINGIFY_(x) #x
#define DID_ENGINE_STRINGIFY(x) DID_ENGINE_STRINGIFY_(x)

namespace {

namespace py = pybind11;

// The vector code the CPU kernels were compiled for: at::vec picks it from CPU_CAPABILITY.
constexpr const char* kCpuCapability =
#ifdef CPU_CAPABILITY
    DID_ENGINE_STRINGIFY(CPU_CAPABILITY);
#else
    "DEFAULT";
#endif

constexpr const char* kCompiler =
#if defined(__clang__)
    "clang " __clang_version__;
#elif defined(__GNUC__)
    "gcc " __VERSION__;
#else
    "unknown";
#endif

py::dict build_facts() {
  py::dict facts;
  facts["cpu_capability"] = kCpuCapability;
#ifdef DID_ENGINE_WITH_CUDA
  facts["cuda"] = true;
  facts["cuda_arch_list"] = did_engine::build_config::kCudaArchList;
  facts["cuda_version"] = did_engine::build_config::kCudaVersion;
  facts["nvcc_flags"] = did_engine::build_config::kNvccFlags;
#else
  facts["cuda"] = false;
  facts["cuda_arch_list"] = py::none();
  facts["cuda_version"] = py::none();
  facts["nvcc_flags"] = py::none();
#endif
#ifdef _OPENMP
  facts["openmp"] = true;
#else
  facts["openmp"] = false;
#endif
  facts["compiler"] = kCompiler;
  facts["cxx_flags"] = did_engine::build_config::kCxxFlags;
  facts["debug"] = did_engine::build_config::kDebug;
  facts["torch_version_at_build"] = did_engine::build_config::kTorchVersion;
  return facts;
}

// OpenMP's thread limit now (0 without OpenMP): at::parallel_for runs on these threads.
int omp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "did_engine's compiled op library; the ops are torch.ops.did_engine.*";
  m.def("build_facts", &build_facts,
        "How this library was compiled: cpu_capability, cuda, cuda_arch_list, cuda_version, openmp, "
        "compiler, cxx_flags, nvcc_flags, debug, torch_version_at_build.");
  m.def("omp_max_threads", &omp_max_threads, "OpenMP's thread limit now (0 when built without OpenMP).");
}
