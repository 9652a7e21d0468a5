// block_decode_attention on CUDA: the active block's n queries attend, without a mask, to
// cache[b, :cache_lens[b]] followed by the block's own n keys (split-KV, "FlashDecoding").
//
// Work decomposition
//   * GQA: the G = H / H_kv query heads of one kv head share one pass over its keys. For a
//     (batch row b, kv head) pair there are R = n * G query rows; row r is query token
//     r / G of head kv_head * G + r % G.
//   * Rows are cut into row groups (64 rows on the tensor-core path, 4..16 on the FMA
//     path), and the row's key sequence [cache[:len]; block], len + n keys, into splits of
//     keys_per_split keys (a multiple of 64). The split count depends only on shapes
//     (S_max, batch, heads), never on cache_lens, so the launch is graph-capturable.
//   * One CTA (4 warps) = (b, kv head, row group, split). It streams its split's keys
//     through shared memory tile by tile and keeps an online softmax in float32.
//       - tensor cores (bf16/fp16, head_dim 64 or 128, aligned): 64-key tiles staged with
//         cp.async (16-byte copies), double-buffered. The CTA's rows form 1..4 M-tiles of
//         16; the 4 warps are spread over M-tiles x key chunks (with one M-tile, warp w
//         takes keys 16w..16w+15 of every tile), and warps sharing an M-tile merge their
//         softmax states through shared memory at the end.
//       - FMA (float32, other head dims up to 256, unaligned tensors): tiles staged as
//         float32 (16-byte loads when aligned); each warp owns up to 4 rows.
//   * A split writes its normalised partial output and its log2-sum-exp (-inf for a split
//     with no keys, e.g. beyond a short cache); decode_combine_kernel merges the splits.
//     With a single split the main kernel writes the final output itself.

#include "attention_fma.cuh"
#include "attention_mma.cuh"
#include "common.cuh"

namespace did_engine {
namespace cuda {

constexpr int kDecodeThreads = 128;    // 4 warps per CTA, both paths
constexpr int kDecodeTileKeys = 64;    // keys_per_split is a multiple of this
constexpr int kDecodeMmaRowsPerCta = 64;
constexpr int kDecodeMaxSplits = 64;

// DecodeAttentionParams is in launch.h.

// What one CTA works on.
struct DecodeCta {
  int b, kv_head, split;
  int row0, rows;     // query rows [row0, row0 + rows) of this kv head (0 < rows <= rows_per_cta)
  int cache_len;      // cache_lens[b] clamped to [0, S_max]
  int key_begin;      // this split's keys [key_begin, key_end) of the len + n keys
  int key_end;
};

// blockIdx.x enumerates (row group fastest, then split, kv head, batch row): CTAs that
// read the same keys run side by side.
__device__ __forceinline__ DecodeCta decode_cta(const DecodeAttentionParams& p) {
  DecodeCta cta;
  int64_t idx = blockIdx.x;
  const int row_group = static_cast<int>(idx % p.row_groups);
  idx /= p.row_groups;
  cta.split = static_cast<int>(idx % p.num_splits);
  idx /= p.num_splits;
  cta.kv_head = static_cast<int>(idx % p.kv_heads);
  cta.b = static_cast<int>(idx / p.kv_heads);
  const int rows_total = p.block_len * p.group;
  cta.row0 = row_group * p.rows_per_cta;
  cta.rows = min(p.rows_per_cta, rows_total - cta.row0);
  const int len = p.cache_lens[cta.b * p.cache_lens_stride];
  cta.cache_len = min(max(len, 0), p.cache_capacity);  // memory safety for any value
  const int total_keys = cta.cache_len + p.block_len;
  cta.key_begin = min(cta.split * p.keys_per_split, total_keys);
  cta.key_end = min(cta.key_begin + p.keys_per_split, total_keys);
  return cta;
}

// Key j of row b's sequence [cache[:len]; block] for one kv head.
template <typename T>
__device__ __forceinline__ KeyValueRows<T> decode_key_rows(const DecodeAttentionParams& p, const DecodeCta& cta,
                                                           int j) {
  if (j < cta.cache_len) {
    return {static_cast<const T*>(p.k_cache) + cta.b * p.k_cache_strides[0] + j * p.k_cache_strides[1] +
                cta.kv_head * p.k_cache_strides[2],
            static_cast<const T*>(p.v_cache) + cta.b * p.v_cache_strides[0] + j * p.v_cache_strides[1] +
                cta.kv_head * p.v_cache_strides[2]};
  }
  const int t = j - cta.cache_len;
  return {static_cast<const T*>(p.k_block) + cta.b * p.k_block_strides[0] + t * p.k_block_strides[1] +
              cta.kv_head * p.k_block_strides[2],
          static_cast<const T*>(p.v_block) + cta.b * p.v_block_strides[0] + t * p.v_block_strides[1] +
              cta.kv_head * p.v_block_strides[2]};
}

// Query row `row` (CTA-local) of this kv head: token (row0 + row) / G, head kv_head * G + ...
template <typename T>
__device__ __forceinline__ const T* decode_query_row(const DecodeAttentionParams& p, const DecodeCta& cta, int row) {
  const int r = cta.row0 + row;
  return static_cast<const T*>(p.q) + cta.b * p.q_strides[0] + (r / p.group) * p.q_strides[1] +
         (cta.kv_head * p.group + r % p.group) * p.q_strides[2];
}

// Writes element d of CTA-local row `row`: the final output when there is one split,
// otherwise this split's normalised partial and (once per row) its log2-sum-exp.
// num / den is the row's softmax-weighted sum, row_max the max score (log2 domain) it is
// relative to; den == 0 means the split saw no keys.
template <typename T>
__device__ __forceinline__ void write_decode_result(const DecodeAttentionParams& p, const DecodeCta& cta, int row,
                                                    int d, float num, float den, float row_max) {
  const int r = cta.row0 + row;
  const int64_t out_row =
      (static_cast<int64_t>(cta.b) * p.block_len + r / p.group) * p.heads + cta.kv_head * p.group + r % p.group;
  const float value = den > 0.f ? num / den : 0.f;
  if (p.num_splits == 1) {
    static_cast<T*>(p.out)[out_row * p.head_dim + d] = from_float<T>(value);
  } else {
    const int64_t slot = out_row * p.num_splits + cta.split;
    p.partial_out[slot * p.head_dim + d] = value;
    if (d == 0) p.partial_lse[slot] = den > 0.f ? row_max + log2f(den) : kNegInf;
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core path. Shared memory: two buffers of {keys, values}[64][D + 8] 16-bit values
// (the +8 pad makes fragment reads conflict-free and keeps rows 16-byte aligned), reused
// at the end for the warps' merge: acc [4 warps][16][D] + max, sum [4 warps][16] floats.

template <int D>
constexpr size_t decode_mma_smem_bytes() {
  constexpr size_t tiles = 2 * 2 * kDecodeTileKeys * (D + 8) * sizeof(uint16_t);
  constexpr size_t merge = (4 * 16 * D + 2 * 4 * 16) * sizeof(float);
  return tiles > merge ? tiles : merge;
}

template <typename T, int D, FragmentLoads kLoads>
__global__ void __launch_bounds__(kDecodeThreads) decode_attention_mma_kernel(const DecodeAttentionParams p) {
  constexpr int kPitch = D + 8;
  constexpr int kTileElems = kDecodeTileKeys * kPitch;
  constexpr int kChunks = kDecodeTileKeys / 16;  // 16-key chunks per tile
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* smem = reinterpret_cast<uint16_t*>(smem_raw);
  auto key_buffer = [&](int buf) { return smem + (2 * buf) * kTileElems; };
  auto value_buffer = [&](int buf) { return smem + (2 * buf + 1) * kTileElems; };

  const DecodeCta cta = decode_cta(p);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  // Warps over (M-tile, key chunk): m_slots (1, 2 or 4) M-tile slots, key_parts warps each.
  const int m_tiles = static_cast<int>(ceil_div(cta.rows, 16));
  const int m_slots = m_tiles <= 1 ? 1 : (m_tiles <= 2 ? 2 : 4);
  const int key_parts = 4 / m_slots;
  const int my_m_tile = warp % m_slots, my_part = warp / m_slots;
  const int my_rows = max(0, min(16, cta.rows - my_m_tile * 16));

  MmaRowTile<T, D, kLoads> tile;
  tile.init();
  tile.load_queries([&](int r) { return decode_query_row<T>(p, cta, my_m_tile * 16 + r); }, my_rows);

  // Always-valid address for zero-filled copies: the block's first key of this kv head.
  const T* fallback_row = static_cast<const T*>(p.k_block) + cta.b * p.k_block_strides[0] +
                          cta.kv_head * p.k_block_strides[2];
  const int num_tiles = static_cast<int>(ceil_div(cta.key_end - cta.key_begin, kDecodeTileKeys));
  auto stage = [&](int tile_index, int buf) {
    const int first = cta.key_begin + tile_index * kDecodeTileKeys;
    stage_tile_async<T, D>(key_buffer(buf), value_buffer(buf), kPitch, kDecodeTileKeys,
                           min(kDecodeTileKeys, cta.key_end - first), fallback_row,
                           [&](int j) { return decode_key_rows<T>(p, cta, first + j); });
  };

  if (num_tiles > 0) stage(0, 0);
  cp_async_commit();
  for (int t = 0; t < num_tiles; ++t) {
    if (t + 1 < num_tiles) stage(t + 1, (t + 1) & 1);
    cp_async_commit();   // possibly empty: keeps one group per iteration
    cp_async_wait<1>();  // tile t has landed (only tile t + 1 may be in flight)
    __syncthreads();
    const int buf = t & 1;
    const int first = cta.key_begin + t * kDecodeTileKeys;
    if (my_rows > 0) {
      for (int chunk = my_part; chunk < kChunks; chunk += key_parts) {
        const int chunk_first = first + chunk * 16;
        if (chunk_first >= cta.key_end) break;
        const int chunk_keys = cta.key_end - chunk_first;  // keys j < chunk_keys are real
        tile.template attend<16>(key_buffer(buf) + chunk * 16 * kPitch, value_buffer(buf) + chunk * 16 * kPitch,
                                 kPitch, p.scale_log2, [&](int, int j) { return j < chunk_keys; });
      }
    }
    __syncthreads();  // buffer `buf` is refilled by the next iteration's stage
  }
  cp_async_wait<0>();
  tile.reduce_row_sums();
  __syncthreads();

  // Merge the warps that share an M-tile: out = sum_w 2^(m_w - m) acc_w / sum_w 2^(m_w - m) l_w.
  float* merge_acc = reinterpret_cast<float*>(smem_raw);  // [4 warps][16][D]
  float* merge_max = merge_acc + 4 * 16 * D;              // [4 warps][16]
  float* merge_sum = merge_max + 4 * 16;                  // [4 warps][16]
  tile.for_each_acc_pair([&](int r, int col, float x, float y) {
    merge_acc[(warp * 16 + r) * D + col] = x;
    merge_acc[(warp * 16 + r) * D + col + 1] = y;
  });
  if ((lane & 3) == 0) {
    const int g = lane >> 2;
    merge_max[warp * 16 + g] = tile.row_max[0];
    merge_max[warp * 16 + g + 8] = tile.row_max[1];
    merge_sum[warp * 16 + g] = tile.row_sum[0];
    merge_sum[warp * 16 + g + 8] = tile.row_sum[1];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < m_tiles * 16 * D; idx += blockDim.x) {
    const int m_tile = idx / (16 * D), r = (idx / D) % 16, d = idx % D;
    const int row = m_tile * 16 + r;
    if (row >= cta.rows) continue;
    float row_max = kNegInf;
    for (int part = 0; part < key_parts; ++part) row_max = fmaxf(row_max, merge_max[(m_tile + part * m_slots) * 16 + r]);
    float num = 0.f, den = 0.f;
    if (row_max != kNegInf) {
      for (int part = 0; part < key_parts; ++part) {
        const int w = m_tile + part * m_slots;
        const float weight = exp2f(merge_max[w * 16 + r] - row_max);  // 0 for a warp without keys
        num += weight * merge_acc[(w * 16 + r) * D + d];
        den += weight * merge_sum[w * 16 + r];
      }
    }
    write_decode_result<T>(p, cta, row, d, num, den, row_max);
  }
}

// ---------------------------------------------------------------------------------------
// FMA path: any head_dim <= D_CAP, any float dtype. Warp w owns CTA rows
// [w * rows_per_warp, (w + 1) * rows_per_warp).

template <typename T, int D_CAP>
__global__ void __launch_bounds__(kDecodeThreads) decode_attention_fma_kernel(const DecodeAttentionParams p) {
  using Shape = FmaTileShape<D_CAP>;
  constexpr int kTileKeys = Shape::kTileKeys;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* queries = reinterpret_cast<float*>(smem_raw);  // [16][D_CAP]
  float* keys = queries + 16 * D_CAP;                    // [kTileKeys][D_CAP + 1]
  float* values = keys + kTileKeys * (D_CAP + 1);        // [kTileKeys][D_CAP]
  float* probs = values + kTileKeys * D_CAP;             // [4 warps][4 rows][kTileKeys]

  const DecodeCta cta = decode_cta(p);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int head_dim = p.head_dim;
  const int k_pitch = fma_key_pitch(head_dim);
  const int my_first = warp * p.rows_per_warp;
  const int my_rows = max(0, min(p.rows_per_warp, cta.rows - my_first));

  stage_rows_as_float<T>(queries, D_CAP, cta.rows, cta.rows, head_dim,
                         [&](int r) { return decode_query_row<T>(p, cta, r); });

  FmaRowGroup<D_CAP> group;
  group.init();
  for (int first = cta.key_begin; first < cta.key_end; first += kTileKeys) {
    const int tile_keys = min(kTileKeys, cta.key_end - first);
    __syncthreads();  // previous tile consumed; queries staged
    stage_tile_as_float<T>(keys, k_pitch, values, head_dim, kTileKeys, tile_keys, head_dim, p.vector_loads,
                           [&](int j) { return decode_key_rows<T>(p, cta, first + j); });
    __syncthreads();
    if (my_rows > 0) {
      group.attend(queries + my_first * D_CAP, D_CAP, my_rows, keys, k_pitch, values, head_dim, head_dim, tile_keys,
                   probs + warp * Shape::kRowsPerWarp * kTileKeys, p.scale_log2, [](int, int) { return true; });
    }
  }

#pragma unroll
  for (int r = 0; r < Shape::kRowsPerWarp; ++r) {
    if (r >= my_rows) break;
#pragma unroll
    for (int i = 0; i < D_CAP / 32; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) write_decode_result<T>(p, cta, my_first + r, d, group.acc[r][i], group.row_sum[r], group.row_max[r]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Split combine: one warp per output row (b, t, h). With o_s the normalised partial of
// split s and lse_s its log2-sum-exp: out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),
// M = max_s lse_s. Splits without keys have lse_s = -inf and weight 0.

template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) decode_combine_kernel(const DecodeAttentionParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kDecodeThreads / 32) + (threadIdx.x >> 5);
  const int64_t rows = static_cast<int64_t>(p.batch) * p.block_len * p.heads;
  if (row >= rows) return;  // whole warps leave together
  const int lane = threadIdx.x & 31;
  const float* lse = p.partial_lse + row * p.num_splits;
  float max_lse = kNegInf;
  for (int s = lane; s < p.num_splits; s += 32) max_lse = fmaxf(max_lse, lse[s]);
  max_lse = warp_max(max_lse);
  float den = 0.f;
  if (max_lse != kNegInf)
    for (int s = lane; s < p.num_splits; s += 32) den += exp2f(lse[s] - max_lse);
  den = warp_sum(den);
  const float* partial = p.partial_out + row * p.num_splits * p.head_dim;
  T* out = static_cast<T*>(p.out) + row * p.head_dim;
  for (int d = lane; d < p.head_dim; d += 32) {
    float num = 0.f;
    if (max_lse != kNegInf)
      for (int s = 0; s < p.num_splits; ++s) num += exp2f(lse[s] - max_lse) * partial[s * p.head_dim + d];
    out[d] = from_float<T>(den > 0.f ? num / den : 0.f);
  }
}

// ---------------------------------------------------------------------------------------
// Planning and launch (host, no ATen).

// Picks the path, the row grouping and the split count from shapes and alignment only.
int64_t plan_decode_attention(DecodeAttentionParams& p, FloatKind kind, int num_sms) {
  const int64_t elem = kind == FloatKind::kFloat32 ? 4 : 2;
  const bool kv_rows_16b = is_aligned(p.k_cache, 16) && is_aligned(p.v_cache, 16) && is_aligned(p.k_block, 16) &&
                           is_aligned(p.v_block, 16) && strides_aligned(p.k_cache_strides, 3, elem, 16) &&
                           strides_aligned(p.v_cache_strides, 3, elem, 16) &&
                           strides_aligned(p.k_block_strides, 3, elem, 16) &&
                           strides_aligned(p.v_block_strides, 3, elem, 16);
  const bool q_rows_4b = is_aligned(p.q, 4) && strides_aligned(p.q_strides, 3, elem, 4);
  p.tensor_cores = kind != FloatKind::kFloat32 && (p.head_dim == 64 || p.head_dim == 128) && kv_rows_16b && q_rows_4b;
  p.vector_loads = kv_rows_16b && (p.head_dim * elem) % 16 == 0;

  const int64_t rows_total = static_cast<int64_t>(p.block_len) * p.group;
  if (p.tensor_cores) {
    p.rows_per_warp = 0;
    p.rows_per_cta = kDecodeMmaRowsPerCta;
  } else {
    p.rows_per_warp = static_cast<int>(std::min<int64_t>(4, ceil_div(rows_total, 4)));
    p.rows_per_cta = 4 * p.rows_per_warp;
  }
  p.row_groups = static_cast<int>(ceil_div(rows_total, p.rows_per_cta));

  // Splits: aim at ~16 CTAs per SM (several waves, so the last one matters little), but
  // give each split enough tiles that its float32 partial (rows x D x 4 bytes, written and
  // read back) stays small next to the keys it reads (tiles x 64 x D x 2 x elem bytes):
  // overhead <= 1/8 needs tiles >= rows / (2 * elem).
  const int64_t base_ctas = static_cast<int64_t>(p.batch) * p.kv_heads * p.row_groups;
  const int64_t tiles = ceil_div(static_cast<int64_t>(p.cache_capacity) + p.block_len, kDecodeTileKeys);
  const int64_t cta_rows = std::min<int64_t>(rows_total, p.rows_per_cta);
  const int64_t min_tiles_per_split = std::max<int64_t>(1, ceil_div(cta_rows, 2 * elem));
  int64_t splits = ceil_div(16 * static_cast<int64_t>(num_sms), base_ctas);
  splits = std::min<int64_t>({splits, tiles / min_tiles_per_split, kDecodeMaxSplits});
  splits = std::max<int64_t>(1, splits);
  const int64_t tiles_per_split = ceil_div(tiles, splits);
  p.num_splits = static_cast<int>(ceil_div(tiles, tiles_per_split));
  p.keys_per_split = static_cast<int>(tiles_per_split * kDecodeTileKeys);
  return base_ctas * p.num_splits;
}

template <auto kKernel>
inline cudaError_t launch_with_smem(int64_t ctas, size_t smem, cudaStream_t stream, const DecodeAttentionParams& p) {
  const cudaError_t err = allow_dynamic_smem<kKernel>(smem);
  if (err != cudaSuccess) return err;
  kKernel<<<static_cast<unsigned>(ctas), kDecodeThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, FragmentLoads kLoads>
inline cudaError_t launch_decode_mma(const DecodeAttentionParams& p, int64_t ctas, cudaStream_t stream) {
  if (p.head_dim == 64)
    return launch_with_smem<decode_attention_mma_kernel<T, 64, kLoads>>(ctas, decode_mma_smem_bytes<64>(), stream, p);
  return launch_with_smem<decode_attention_mma_kernel<T, 128, kLoads>>(ctas, decode_mma_smem_bytes<128>(), stream, p);
}

template <typename T>
inline cudaError_t launch_decode_main(const DecodeAttentionParams& p, int64_t ctas, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (p.tensor_cores) {
      if (requested_fragment_loads() == FragmentLoads::kScalar)
        return launch_decode_mma<T, FragmentLoads::kScalar>(p, ctas, stream);
      return launch_decode_mma<T, FragmentLoads::kLdmatrix>(p, ctas, stream);
    }
  }
  if (p.head_dim <= 64)
    return launch_with_smem<decode_attention_fma_kernel<T, 64>>(ctas, fma_smem_floats<64>() * sizeof(float), stream, p);
  if (p.head_dim <= 128)
    return launch_with_smem<decode_attention_fma_kernel<T, 128>>(ctas, fma_smem_floats<128>() * sizeof(float), stream,
                                                                 p);
  return launch_with_smem<decode_attention_fma_kernel<T, 256>>(ctas, fma_smem_floats<256>() * sizeof(float), stream, p);
}

template <typename T>
inline cudaError_t launch_decode(const DecodeAttentionParams& p, cudaStream_t stream) {
  const int64_t ctas = static_cast<int64_t>(p.batch) * p.kv_heads * p.row_groups * p.num_splits;
  cudaError_t err = launch_decode_main<T>(p, ctas, stream);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.block_len * p.heads;
  decode_combine_kernel<T><<<static_cast<unsigned>(ceil_div(rows, kDecodeThreads / 32)), kDecodeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_block_decode_attention(const DecodeAttentionParams& p, FloatKind kind, cudaStream_t stream) {
  switch (kind) {
    case FloatKind::kFloat32:
      return launch_decode<float>(p, stream);
    case FloatKind::kBFloat16:
      return launch_decode<__nv_bfloat16>(p, stream);
    case FloatKind::kFloat16:
      return launch_decode<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace did_engine
