// kv_commit on CPU: copy each row's finished block into the caches at its length.
//
// All lengths are validated before anything is written, so a refused call leaves the
// caches and cache_lens untouched.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "checks.h"
#include "cpu/ops_cpu.h"

namespace did_engine {

void kv_commit_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_block_in,
                   const at::Tensor& v_block_in, at::Tensor& cache_lens) {
  check_kv_commit(k_cache, v_cache, k_block_in, v_block_in, cache_lens);
  TORCH_CHECK_VALUE(k_cache.device().is_cpu(), "kv_commit: k_cache is on ", k_cache.device(),
                    ", not on the CPU (the CPU kernel was called)");
  const int64_t B = k_cache.size(0), S_max = k_cache.size(1), H_kv = k_cache.size(2), D = k_cache.size(3);
  const int64_t n = k_block_in.size(1);

  auto lens = cache_lens.accessor<int32_t, 1>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] + n <= S_max, "kv_commit: cache_lens[", b, "] = ", lens[b],
                      " leaves no room for a block of ", n, " in a cache of S_max=", S_max,
                      " (valid lengths: 0..", S_max - n, ")");
  }
  // Empty blocks or rows (n, H_kv or D == 0) copy nothing, but the lengths still advance.
  if (n > 0 && H_kv > 0 && D > 0) {
    // Rows of D elements are the unit of copying; the block is made last-dim contiguous once.
    const at::Tensor k_block = k_block_in.stride(-1) == 1 ? k_block_in : k_block_in.contiguous();
    const at::Tensor v_block = v_block_in.stride(-1) == 1 ? v_block_in : v_block_in.contiguous();
    const int64_t elem = k_cache.element_size();
    const int64_t row_bytes = D * elem;

    auto copy_rows = [&](at::Tensor& cache, const at::Tensor& block) {
      char* dst = static_cast<char*>(cache.data_ptr());
      const char* src = static_cast<const char*>(block.data_ptr());
      const int64_t cs0 = cache.stride(0) * elem, cs1 = cache.stride(1) * elem, cs2 = cache.stride(2) * elem;
      const int64_t bs0 = block.stride(0) * elem, bs1 = block.stride(1) * elem, bs2 = block.stride(2) * elem;
      at::parallel_for(0, B * n, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / n, t = i % n;
          char* d = dst + b * cs0 + (lens[b] + t) * cs1;
          const char* s = src + b * bs0 + t * bs1;
          for (int64_t h = 0; h < H_kv; ++h) std::memcpy(d + h * cs2, s + h * bs2, row_bytes);
        }
      });
    };
    copy_rows(k_cache, k_block);
    copy_rows(v_cache, v_block);
  }
  for (int64_t b = 0; b < B; ++b) lens[b] += static_cast<int32_t>(n);
}

}  // namespace did_engine
