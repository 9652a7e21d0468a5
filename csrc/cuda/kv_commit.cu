// kv_commit on CUDA: copy each row's finished block into the caches at cache_lens[b], then
// advance cache_lens[b] by n, in place.
//
// Work decomposition
//   * kv_commit_copy_kernel: the block is B * n * H_kv rows of head_dim elements; each row
//     is cut into units of 16, 8, 4 or 2 bytes (the widest that every row start, stride and
//     the row length allow) and one thread copies one unit of k and the same unit of v,
//     grid-stride. A thread reads cache_lens[b] itself. Index and offset math is 32-bit
//     when the unit count and every tensor's byte extent fit (the usual case: integer
//     division is several times cheaper), 64-bit otherwise.
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

template <typename Unit, typename Index>
__global__ void __launch_bounds__(kCommitThreads) kv_commit_copy_kernel(const KvCommitParams p) {
  const Index units_per_row = static_cast<Index>(p.row_bytes / static_cast<int64_t>(sizeof(Unit)));
  const Index kv_heads = p.kv_heads, block_len = p.block_len;
  const Index total = static_cast<Index>(p.batch) * block_len * kv_heads * units_per_row;
  const Index s[4][3] = {
      {static_cast<Index>(p.k_block_strides[0]), static_cast<Index>(p.k_block_strides[1]),
       static_cast<Index>(p.k_block_strides[2])},
      {static_cast<Index>(p.v_block_strides[0]), static_cast<Index>(p.v_block_strides[1]),
       static_cast<Index>(p.v_block_strides[2])},
      {static_cast<Index>(p.k_cache_strides[0]), static_cast<Index>(p.k_cache_strides[1]),
       static_cast<Index>(p.k_cache_strides[2])},
      {static_cast<Index>(p.v_cache_strides[0]), static_cast<Index>(p.v_cache_strides[1]),
       static_cast<Index>(p.v_cache_strides[2])}};
  for (Index idx = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index unit = idx % units_per_row;
    Index rest = idx / units_per_row;
    const Index h = rest % kv_heads;
    rest /= kv_heads;
    const Index t = rest % block_len;
    const Index b = rest / block_len;
    const int len = p.cache_lens[static_cast<int64_t>(b) * p.cache_lens_stride];
    if (!commit_fits(len, p.block_len, p.cache_capacity)) continue;
    const Index pos = static_cast<Index>(len) + t;
    const Unit* k_src = reinterpret_cast<const Unit*>(p.k_block + (b * s[0][0] + t * s[0][1] + h * s[0][2]));
    const Unit* v_src = reinterpret_cast<const Unit*>(p.v_block + (b * s[1][0] + t * s[1][1] + h * s[1][2]));
    Unit* k_dst = reinterpret_cast<Unit*>(p.k_cache + (b * s[2][0] + pos * s[2][1] + h * s[2][2]));
    Unit* v_dst = reinterpret_cast<Unit*>(p.v_cache + (b * s[3][0] + pos * s[3][1] + h * s[3][2]));
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

// Largest byte offset (exclusive) a [batch, rows, kv_heads, row_bytes] view with these byte
// strides reaches from its data pointer.
inline int64_t byte_extent(const int64_t (&strides)[3], int64_t batch, int64_t rows, int64_t kv_heads,
                           int64_t row_bytes) {
  return (batch - 1) * strides[0] + (rows - 1) * strides[1] + (kv_heads - 1) * strides[2] + row_bytes;
}

template <typename Unit>
inline cudaError_t launch_kv_commit_copy(const KvCommitParams& p, int num_sms, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(p.batch) * p.block_len * p.kv_heads * (p.row_bytes / static_cast<int64_t>(sizeof(Unit)));
  if (total == 0) return cudaSuccess;
  const int64_t ctas = std::min<int64_t>(ceil_div(total, kCommitThreads), static_cast<int64_t>(num_sms) * 16);
  // 32-bit when no index (the grid-stride loop's last step included) and no byte offset can
  // pass INT32_MAX.
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
  const bool fits_32 =
      total + ctas * kCommitThreads <= kMax32 &&
      byte_extent(p.k_cache_strides, p.batch, p.cache_capacity, p.kv_heads, p.row_bytes) <= kMax32 &&
      byte_extent(p.v_cache_strides, p.batch, p.cache_capacity, p.kv_heads, p.row_bytes) <= kMax32 &&
      byte_extent(p.k_block_strides, p.batch, p.block_len, p.kv_heads, p.row_bytes) <= kMax32 &&
      byte_extent(p.v_block_strides, p.batch, p.block_len, p.kv_heads, p.row_bytes) <= kMax32;
  if (fits_32)
    kv_commit_copy_kernel<Unit, int32_t><<<static_cast<unsigned>(ctas), kCommitThreads, 0, stream>>>(p);
  else
    kv_commit_copy_kernel<Unit, int64_t><<<static_cast<unsigned>(ctas), kCommitThreads, 0, stream>>>(p);
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
