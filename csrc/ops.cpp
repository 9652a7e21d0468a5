// The did_engine op registry: every schema lives here, once. Kernels register their
// implementations per dispatch key in csrc/cpu/*.cpp and csrc/cuda/*.cu.
//
// Python wrappers, fake (meta) kernels and pure-PyTorch references are in
// did_engine/ops/. Tensor layouts follow FlashAttention: [batch, seq, heads, head_dim].

#include <torch/library.h>

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace did_engine {

// [openmp compiled in (0/1), omp max threads, at::get_num_threads(), cuda compiled in (0/1)]
static std::vector<int64_t> build_flags() {
  std::vector<int64_t> flags(4, 0);
#ifdef _OPENMP
  flags[0] = 1;
  flags[1] = omp_get_max_threads();
#endif
  flags[2] = at::get_num_threads();
#ifdef DID_ENGINE_WITH_CUDA
  flags[3] = 1;
#endif
  return flags;
}

TORCH_LIBRARY(did_engine, m) {
  // Sampling hot path: the active block's queries attend to cache[:cache_lens[b]] followed
  // by the block's own keys, with no mask. Output has q's shape and dtype.
  m.def(
      "block_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_block, "
      "Tensor v_block, Tensor cache_lens, float? scale=None) -> Tensor");
  // Appends a finished block at each row's length and advances cache_lens, in place.
  m.def(
      "kv_commit(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_block, Tensor v_block, "
      "Tensor(c!) cache_lens) -> ()");
  // Prefill / no-cache path: query block j attends to key blocks <= j.
  m.def("block_causal_attention(Tensor q, Tensor k, Tensor v, int block_size, float? scale=None) -> Tensor");
  // Per row, the num_remask eligible positions of lowest confidence get mask_id (tokens) and
  // reset_value (confidence), in place; returns their indices [B, max_k], ascending, -1 padded.
  m.def(
      "snapshot_remask(Tensor(a!) tokens, Tensor(b!) confidence, Tensor num_remask, Tensor eligible, "
      "int mask_id, float reset_value, int max_k) -> Tensor");
  // What this library was compiled with (no tensor arguments, so one catch-all kernel).
  m.def("_build_flags() -> int[]", &build_flags);
}

}  // namespace did_engine
