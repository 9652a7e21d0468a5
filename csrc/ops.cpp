// The did_engine op registry: every schema lives here, once.
//
// Registration rule (the same for every backend): each backend directory has one
// registration file beside its kernels that implements every op for its dispatch key:
//   csrc/cpu/ops_cpu.cpp    TORCH_LIBRARY_IMPL(did_engine, CPU, m)   kernels: csrc/cpu/<op>.cpp
//   csrc/cuda/ops_cuda.cu   TORCH_LIBRARY_IMPL(did_engine, CUDA, m)  kernels: csrc/cuda/<op>.cu
// Adding an op: its schema here, its kernel file and one m.impl line per backend.
//
// Python wrappers, fake (meta) kernels and pure-PyTorch references are in
// did_engine/ops/. The Python module did_engine._C (csrc/python_module.cpp, pybind11)
// only reports build facts; the ops are reached through torch.ops.did_engine. Tensor
// layouts follow FlashAttention: [batch, seq, heads, head_dim].

#include <torch/library.h>

namespace did_engine {

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
}

}  // namespace did_engine
