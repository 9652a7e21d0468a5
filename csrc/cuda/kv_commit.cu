// kv_commit on CUDA: copy each row's finished block into the caches at cache_lens[b], then
// advance cache_lens[b] by n, in place.
//
// Work decomposition
//   * kv_commit_copy_kernel: the block is B * n * H_kv rows of head_dim elements; each row
//     is cut into units of 16, 8, 4 or 2 bytes (the widest that every row start, stride and
//     the row length allow) and one thread copies one unit of k and the same unit of v,
//     grid-stride. A thread reads cache_lens[b] itself.
//   * kv_commit_advance_kernel: one thread per batch row adds n to cache_lens[b]. It is a
//     second launch on the same stream, so it runs after every copy has read the old length.
//   * Memory safety for any value: a row whose length is outside [0, S_max - n] is skipped
//     by both kernels (nothing written, length unchanged). DID_ENGINE_CHECK_VALUES=1 turns
//     that case into the CPU kernel's ValueError instead (see common.cuh).

#include "common.cuh"

namespace did_engine {
namespace cuda {

constexpr int kCommitThreads = 256;

// KvCommitParams is in launch.h.

__device__ __forceinline__ bool commit_fits(int len, int block_len, int capacity) {
  return len >= 0 && len <= capacity - block_len;
}

template <typename Unit>
__global__ void __launch_bounds__(kCommitThreads) kv_commit_copy_kernel(const KvCommitParams p) {
  const int64_t units_per_row = p.row_bytes / static_cast<int64_t>(sizeof(Unit));
  const int64_t total = static_cast<int64_t>(p.batch) * p.block_len * p.kv_heads * units_per_row;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t unit = idx % units_per_row;
    int64_t rest = idx / units_per_row;
    const int64_t h = rest % p.kv_heads;
    rest /= p.kv_heads;
    const int64_t t = rest % p.block_len;
    const int64_t b = rest / p.block_len;
    const int len = p.cache_lens[b * p.cache_lens_stride];
    if (!commit_fits(len, p.block_len, p.cache_capacity)) continue;
    const int64_t pos = len + t;
    const Unit* k_src = reinterpret_cast<const Unit*>(p.k_block + b * p.k_block_strides[0] + t * p.k_block_strides[1] +
                                                      h * p.k_block_strides[2]);
    const Unit* v_src = reinterpret_cast<const Unit*>(p.v_block + b * p.v_block_strides[0] + t * p.v_block_strides[1] +
                                                      h * p.v_block_strides[2]);
    Unit* k_dst = reinterpret_cast<Unit*>(p.k_cache + b * p.k_cache_strides[0] + pos * p.k_cache_strides[1] +
                                          h * p.k_cache_strides[2]);
    Unit* v_dst = reinterpret_cast<Unit*>(p.v_cache + b * p.v_cache_strides[0] + pos * p.v_cache_strides[1] +
                                          h * p.v_cache_strides[2]);
    k_dst[unit] = k_src[unit];
    v_dst[unit] = v_src[unit];
  }
}

__global__ void __launch_bounds__(kCommitThreads) kv_commit_advance_kernel(const KvCommitParams p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= p.batch) return;
  int32_t* len = p.cache_lens + b * p.cache_lens_stride;
  if (commit_fits(*len, p.block_len, p.cache_capacity)) *len += p.block_len;
}

// Widest copy unit (bytes) that keeps every row start and row length aligned.
inline int kv_commit_unit_bytes(const KvCommitParams& p) {
  for (int unit : {16, 8, 4, 2, 1}) {
    if (p.row_bytes % unit != 0) continue;
    if (!is_aligned(p.k_cache, unit) || !is_aligned(p.v_cache, unit) || !is_aligned(p.k_block, unit) ||
        !is_aligned(p.v_block, unit))
      continue;
    if (!strides_aligned(p.k_cache_strides, 3, 1, unit) || !strides_aligned(p.v_cache_strides, 3, 1, unit) ||
        !strides_aligned(p.k_block_strides, 3, 1, unit) || !strides_aligned(p.v_block_strides, 3, 1, unit))
      continue;
    return unit;
  }
  return 1;
}

template <typename Unit>
inline cudaError_t launch_kv_commit_copy(const KvCommitParams& p, int num_sms, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(p.batch) * p.block_len * p.kv_heads * (p.row_bytes / static_cast<int64_t>(sizeof(Unit)));
  if (total == 0) return cudaSuccess;
  const int64_t ctas = std::min<int64_t>(ceil_div(total, kCommitThreads), static_cast<int64_t>(num_sms) * 16);
  kv_commit_copy_kernel<Unit><<<static_cast<unsigned>(ctas), kCommitThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Copies the block, then advances the lengths (two launches on `stream`).
cudaError_t launch_kv_commit(const KvCommitParams& p, int num_sms, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  switch (kv_commit_unit_bytes(p)) {
    case 16:
      err = launch_kv_commit_copy<uint4>(p, num_sms, stream);
      break;
    case 8:
      err = launch_kv_commit_copy<uint2>(p, num_sms, stream);
      break;
    case 4:
      err = launch_kv_commit_copy<uint32_t>(p, num_sms, stream);
      break;
    case 2:
      err = launch_kv_commit_copy<uint16_t>(p, num_sms, stream);
      break;
    default:
      err = launch_kv_commit_copy<uint8_t>(p, num_sms, stream);
      break;
  }
  if (err != cudaSuccess) return err;
  kv_commit_advance_kernel<<<static_cast<unsigned>(ceil_div(p.batch, kCommitThreads)), kCommitThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace did_engine
