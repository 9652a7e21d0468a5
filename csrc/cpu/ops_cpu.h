// The CPU kernels of the did_engine ops, one per csrc/cpu/<op>.cpp, under the schemas of
// csrc/ops.cpp. csrc/cpu/ops_cpu.cpp registers them for the CPU dispatch key.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace did_engine {

at::Tensor block_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& k_block, const at::Tensor& v_block,
                                      const at::Tensor& cache_lens, std::optional<double> scale);

void kv_commit_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_block, const at::Tensor& v_block,
                   at::Tensor& cache_lens);

at::Tensor block_causal_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      int64_t block_size, std::optional<double> scale);

at::Tensor snapshot_remask_cpu(at::Tensor& tokens, at::Tensor& confidence, const at::Tensor& num_remask,
                               const at::Tensor& eligible, int64_t mask_id, double reset_value, int64_t max_k);

}  // namespace did_engine
