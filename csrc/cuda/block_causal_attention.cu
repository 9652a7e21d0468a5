// block_causal_attention on CUDA: flash-style forward where query block j (positions
// j*bs .. j*bs + bs - 1) attends to every key of blocks 0..j.
//
// Work decomposition
//   * Query i may see keys [0, row_end(i)) with row_end(i) = min(S, (i / bs + 1) * bs):
//     its own block and everything before it. row_end(i) >= i + 1, so every row sees at
//     least key 0 and no row is ever fully masked.
//   * One CTA (4 warps) = (query tile, batch row, query head). It streams key tiles
//     [0, row_end(last row of the tile)) through shared memory with an online softmax in
//     float32; tiles above the block diagonal are never loaded. GQA: query head h reads
//     kv head h / G (the G CTAs of a group run side by side and share it through L2).
//       - tensor cores (bf16/fp16, head_dim 64 or 128, aligned): 64 query rows per CTA,
//         16 per warp; 64-key tiles double-buffered with cp.async.
//       - FMA (float32, other head dims up to 256, unaligned): 16 query rows per CTA, 4 per
//         warp; tiles staged as float32.
//     Within a tile, keys at or past a row's row_end get probability 0 and their values
//     never enter that row's sum (0 x NaN would be NaN); a warp skips a tile that lies
//     entirely past its rows' ends.
//   * CTAs are numbered so that the last query tiles (the most keys) start first.

#include "attention_fma.cuh"
#include "attention_mma.cuh"
#include "common.cuh"

namespace did_engine {
namespace cuda {

constexpr int kCausalThreads = 128;
constexpr int kCausalMmaRows = 64;    // query rows per CTA, tensor-core path
constexpr int kCausalMmaTileKeys = 64;
constexpr int kCausalFmaRows = 16;    // query rows per CTA, FMA path

// BlockCausalParams is in launch.h.

// End (exclusive) of the keys query i may see.
__device__ __forceinline__ int causal_row_end(const BlockCausalParams& p, int i) {
  const int64_t block_end = (static_cast<int64_t>(i / p.block_size) + 1) * p.block_size;
  return static_cast<int>(block_end < p.seq_len ? block_end : p.seq_len);
}

// (query tile, batch row, head) of this CTA; the last query tiles get the first CTAs.
struct CausalCta {
  int q_tile, b, h, kv_head;
};

__device__ __forceinline__ CausalCta causal_cta(const BlockCausalParams& p, int rows_per_cta) {
  const int64_t heads_total = static_cast<int64_t>(p.batch) * p.heads;
  const int num_q_tiles = static_cast<int>(ceil_div(p.seq_len, rows_per_cta));
  CausalCta cta;
  cta.q_tile = num_q_tiles - 1 - static_cast<int>(blockIdx.x / heads_total);
  const int64_t bh = blockIdx.x % heads_total;
  cta.b = static_cast<int>(bh / p.heads);
  cta.h = static_cast<int>(bh % p.heads);
  cta.kv_head = cta.h / p.group;
  return cta;
}

template <typename T>
__device__ __forceinline__ KeyValueRows<T> causal_key_rows(const BlockCausalParams& p, const CausalCta& cta, int j) {
  return {static_cast<const T*>(p.k) + cta.b * p.k_strides[0] + j * p.k_strides[1] + cta.kv_head * p.k_strides[2],
          static_cast<const T*>(p.v) + cta.b * p.v_strides[0] + j * p.v_strides[1] + cta.kv_head * p.v_strides[2]};
}

template <typename T>
__device__ __forceinline__ const T* causal_query_row(const BlockCausalParams& p, const CausalCta& cta, int i) {
  return static_cast<const T*>(p.q) + cta.b * p.q_strides[0] + i * p.q_strides[1] + cta.h * p.q_strides[2];
}

template <typename T>
__device__ __forceinline__ T* causal_out_row(const BlockCausalParams& p, const CausalCta& cta, int i) {
  return static_cast<T*>(p.out) + ((static_cast<int64_t>(cta.b) * p.seq_len + i) * p.heads + cta.h) * p.head_dim;
}

// ---------------------------------------------------------------------------------------
// Tensor-core path. Shared memory: two buffers of {keys, values}[64][D + 8] 16-bit values.

template <int D>
constexpr size_t causal_mma_smem_bytes() {
  return 2 * 2 * kCausalMmaTileKeys * (D + 8) * sizeof(uint16_t);
}

template <typename T, int D, FragmentLoads kLoads>
__global__ void __launch_bounds__(kCausalThreads) block_causal_mma_kernel(const BlockCausalParams p) {
  constexpr int kPitch = D + 8;
  constexpr int kTileElems = kCausalMmaTileKeys * kPitch;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* smem = reinterpret_cast<uint16_t*>(smem_raw);
  auto key_buffer = [&](int buf) { return smem + (2 * buf) * kTileElems; };
  auto value_buffer = [&](int buf) { return smem + (2 * buf + 1) * kTileElems; };

  const CausalCta cta = causal_cta(p, kCausalMmaRows);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
  const int S = p.seq_len;
  const int q0 = cta.q_tile * kCausalMmaRows;
  const int warp_row0 = q0 + warp * 16;
  const int warp_rows = max(0, min(16, S - warp_row0));

  MmaRowTile<T, D, kLoads> tile;
  tile.init();
  tile.load_queries([&](int r) { return causal_query_row<T>(p, cta, warp_row0 + r); }, warp_rows);
  // Key ends of this lane's rows g and g + 8 (rows past S get S: harmless, never written).
  const int end_lo = causal_row_end(p, warp_row0 + g);
  const int end_hi = causal_row_end(p, warp_row0 + g + 8);
  const int warp_key_end = warp_rows > 0 ? causal_row_end(p, warp_row0 + warp_rows - 1) : 0;
  // Keys from here on are hidden from some row of the warp (row_end is non-decreasing).
  const int warp_first_masked = causal_row_end(p, min(warp_row0, S - 1));
  const int cta_key_end = causal_row_end(p, min(q0 + kCausalMmaRows, S) - 1);
  const int num_tiles = static_cast<int>(ceil_div(cta_key_end, kCausalMmaTileKeys));

  const T* fallback_row = causal_key_rows<T>(p, cta, 0).key;
  auto stage = [&](int tile_index, int buf) {
    const int first = tile_index * kCausalMmaTileKeys;
    stage_tile_async<T, D>(key_buffer(buf), value_buffer(buf), kPitch, kCausalMmaTileKeys,
                           min(kCausalMmaTileKeys, cta_key_end - first), fallback_row,
                           [&](int j) { return causal_key_rows<T>(p, cta, first + j); });
  };

  stage(0, 0);  // num_tiles >= 1: every row sees key 0
  cp_async_commit();
  for (int t = 0; t < num_tiles; ++t) {
    if (t + 1 < num_tiles) stage(t + 1, (t + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int first = t * kCausalMmaTileKeys;
    if (warp_rows > 0 && first < warp_key_end) {
      tile.template attend<kCausalMmaTileKeys>(
          key_buffer(t & 1), value_buffer(t & 1), kPitch, p.scale_log2,
          [&](int row, int j) { return first + j < (row < 8 ? end_lo : end_hi); },
          first + kCausalMmaTileKeys > warp_first_masked);
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  tile.reduce_row_sums();

  // Normalise and store pairs of adjacent columns (head_dim even, output contiguous).
  const float inv_sum[2] = {tile.row_sum[0] > 0.f ? 1.f / tile.row_sum[0] : 0.f,
                            tile.row_sum[1] > 0.f ? 1.f / tile.row_sum[1] : 0.f};
  tile.for_each_acc_pair([&](int r, int col, float x, float y) {
    if (r >= warp_rows) return;
    const float inv = inv_sum[r >= 8 ? 1 : 0];
    *reinterpret_cast<uint32_t*>(causal_out_row<T>(p, cta, warp_row0 + r) + col) = pack2<T>(x * inv, y * inv);
  });
}

// ---------------------------------------------------------------------------------------
// FMA path: any head_dim <= D_CAP, any float dtype; 16 query rows per CTA, warp w owns
// rows 4w .. 4w + 3 of the tile.

template <typename T, int D_CAP>
__global__ void __launch_bounds__(kCausalThreads) block_causal_fma_kernel(const BlockCausalParams p) {
  using Shape = FmaTileShape<D_CAP>;
  constexpr int kTileKeys = Shape::kTileKeys;
  constexpr int kRowsPerWarp = Shape::kRowsPerWarp;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* queries = reinterpret_cast<float*>(smem_raw);  // [16][D_CAP]
  float* keys = queries + kCausalFmaRows * D_CAP;        // [kTileKeys][D_CAP + 1]
  float* values = keys + kTileKeys * (D_CAP + 1);        // [kTileKeys][D_CAP]
  float* probs = values + kTileKeys * D_CAP;             // [4 warps][4 rows][kTileKeys]

  const CausalCta cta = causal_cta(p, kCausalFmaRows);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int S = p.seq_len, head_dim = p.head_dim;
  const int k_pitch = fma_key_pitch(head_dim);
  const int q0 = cta.q_tile * kCausalFmaRows;
  const int cta_rows = min(kCausalFmaRows, S - q0);
  const int my_first = warp * kRowsPerWarp;
  const int my_rows = max(0, min(kRowsPerWarp, cta_rows - my_first));

  int row_end[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) row_end[r] = causal_row_end(p, min(q0 + my_first + r, S - 1));
  const int warp_key_end = my_rows > 0 ? causal_row_end(p, q0 + my_first + my_rows - 1) : 0;
  const int cta_key_end = causal_row_end(p, q0 + cta_rows - 1);

  stage_rows_as_float<T>(queries, D_CAP, cta_rows, cta_rows, head_dim,
                         [&](int r) { return causal_query_row<T>(p, cta, q0 + r); });

  FmaRowGroup<D_CAP> group;
  group.init();
  for (int first = 0; first < cta_key_end; first += kTileKeys) {
    const int tile_keys = min(kTileKeys, cta_key_end - first);
    __syncthreads();  // previous tile consumed; queries staged
    stage_tile_as_float<T>(keys, k_pitch, values, head_dim, kTileKeys, tile_keys, head_dim, p.vector_loads,
                           [&](int j) { return causal_key_rows<T>(p, cta, first + j); });
    __syncthreads();
    if (my_rows > 0 && first < warp_key_end) {
      group.attend(queries + my_first * D_CAP, D_CAP, my_rows, keys, k_pitch, values, head_dim, head_dim, tile_keys,
                   probs + warp * kRowsPerWarp * kTileKeys, p.scale_log2,
                   [&](int r, int j) { return first + j < row_end[r]; });
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    if (r >= my_rows) break;
    const float inv = group.row_sum[r] > 0.f ? 1.f / group.row_sum[r] : 0.f;
    T* out = causal_out_row<T>(p, cta, q0 + my_first + r);
#pragma unroll
    for (int i = 0; i < D_CAP / 32; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) out[d] = from_float<T>(group.acc[r][i] * inv);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Planning and launch (host, no ATen).

inline int64_t block_causal_ctas(const BlockCausalParams& p) {
  const int rows = p.tensor_cores ? kCausalMmaRows : kCausalFmaRows;
  return ceil_div(p.seq_len, rows) * p.batch * p.heads;
}

int64_t plan_block_causal_attention(BlockCausalParams& p, FloatKind kind) {
  const int64_t elem = kind == FloatKind::kFloat32 ? 4 : 2;
  const bool kv_rows_16b = is_aligned(p.k, 16) && is_aligned(p.v, 16) && strides_aligned(p.k_strides, 3, elem, 16) &&
                           strides_aligned(p.v_strides, 3, elem, 16);
  const bool q_rows_4b = is_aligned(p.q, 4) && strides_aligned(p.q_strides, 3, elem, 4);
  p.tensor_cores = kind != FloatKind::kFloat32 && (p.head_dim == 64 || p.head_dim == 128) && kv_rows_16b && q_rows_4b;
  p.vector_loads = kv_rows_16b && (p.head_dim * elem) % 16 == 0;
  return block_causal_ctas(p);
}

template <auto kKernel>
inline cudaError_t launch_causal(size_t smem, cudaStream_t stream, const BlockCausalParams& p) {
  const cudaError_t err = allow_dynamic_smem<kKernel>(smem);
  if (err != cudaSuccess) return err;
  kKernel<<<static_cast<unsigned>(block_causal_ctas(p)), kCausalThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, FragmentLoads kLoads>
inline cudaError_t launch_block_causal_mma(const BlockCausalParams& p, cudaStream_t stream) {
  if (p.head_dim == 64) return launch_causal<block_causal_mma_kernel<T, 64, kLoads>>(causal_mma_smem_bytes<64>(), stream, p);
  return launch_causal<block_causal_mma_kernel<T, 128, kLoads>>(causal_mma_smem_bytes<128>(), stream, p);
}

template <typename T>
inline cudaError_t launch_block_causal_typed(const BlockCausalParams& p, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (p.tensor_cores) {
      if (requested_fragment_loads() == FragmentLoads::kScalar)
        return launch_block_causal_mma<T, FragmentLoads::kScalar>(p, stream);
      return launch_block_causal_mma<T, FragmentLoads::kLdmatrix>(p, stream);
    }
  }
  if (p.head_dim <= 64) return launch_causal<block_causal_fma_kernel<T, 64>>(fma_smem_floats<64>() * sizeof(float), stream, p);
  if (p.head_dim <= 128)
    return launch_causal<block_causal_fma_kernel<T, 128>>(fma_smem_floats<128>() * sizeof(float), stream, p);
  return launch_causal<block_causal_fma_kernel<T, 256>>(fma_smem_floats<256>() * sizeof(float), stream, p);
}

cudaError_t launch_block_causal_attention(const BlockCausalParams& p, FloatKind kind, cudaStream_t stream) {
  switch (kind) {
    case FloatKind::kFloat32:
      return launch_block_causal_typed<float>(p, stream);
    case FloatKind::kBFloat16:
      return launch_block_causal_typed<__nv_bfloat16>(p, stream);
    case FloatKind::kFloat16:
      return launch_block_causal_typed<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace did_engine
