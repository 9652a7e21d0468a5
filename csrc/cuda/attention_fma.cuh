// Warp-level attention on CUDA cores (float32 FMA), shared by the decode and block-causal
// kernels: the path for float32 inputs, head dims without a tensor-core kernel (anything
// from 1 to 256) and tensors whose alignment rules out the tensor-core path.
#pragma once

#include "common.cuh"

namespace did_engine {
namespace cuda {

// Keys per shared-memory tile of the FMA path, by head-dim capacity (keeps a CTA's shared
// memory near 41-84 KB, see fma_smem_floats).
template <int D_CAP>
struct FmaTileShape {
  static constexpr int kKeysPerLane = D_CAP <= 64 ? 2 : 1;
  static constexpr int kTileKeys = 32 * kKeysPerLane;
  static constexpr int kRowsPerWarp = 4;  // most query rows one warp owns
  static constexpr int kWarps = 4;
};

// Shared memory (in floats) of an FMA-path CTA: staged queries [16][D_CAP], keys
// [tile][D_CAP + 1] (odd pitch: conflict-free column reads), values [tile][D_CAP] and the
// probabilities of each warp [4 warps][4 rows][tile].
template <int D_CAP>
constexpr int fma_smem_floats() {
  using Shape = FmaTileShape<D_CAP>;
  return Shape::kWarps * Shape::kRowsPerWarp * D_CAP + Shape::kTileKeys * (D_CAP + 1) + Shape::kTileKeys * D_CAP +
         Shape::kWarps * Shape::kRowsPerWarp * Shape::kTileKeys;
}

// Row pitch of staged keys: odd, so that 32 lanes reading one column of 32 different key
// rows hit 32 different banks.
__host__ __device__ inline int fma_key_pitch(int head_dim) { return head_dim | 1; }

// One warp's share of an attention problem: up to 4 query rows against key/value tiles
// staged in shared memory as float32, with an online softmax in float32 (log2 domain).
// Lane l computes the scores of tile keys l, l + 32, ... and owns output columns
// d = l, l + 32, ... of every row; the softmax statistics are identical in all lanes.
template <int D_CAP>
struct FmaRowGroup {
  using Shape = FmaTileShape<D_CAP>;
  static constexpr int kRows = Shape::kRowsPerWarp;
  static constexpr int kKeysPerLane = Shape::kKeysPerLane;
  static constexpr int kTileKeys = Shape::kTileKeys;
  static constexpr int kColsPerLane = D_CAP / 32;

  float acc[kRows][kColsPerLane];  // unnormalised output
  float row_max[kRows];            // running max, -inf until a row sees a key
  float row_sum[kRows];            // running denominator

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = kNegInf;
      row_sum[r] = 0.f;
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) acc[r][j] = 0.f;
    }
  }

  // queries: row r's head_dim floats at queries + r * q_pitch, for r < rows (<= 4).
  // keys, values: tile key j's floats at keys + j * k_pitch, values + j * v_pitch for
  //   j < kTileKeys (zero-filled past the valid keys); only j < tile_keys are attended.
  // probs: this warp's scratch of kRows * kTileKeys floats.
  // allowed(r, j): whether row r may see tile key j.
  template <class Allowed>
  __device__ __forceinline__ void attend(const float* queries, int q_pitch, int rows, const float* keys, int k_pitch,
                                         const float* values, int v_pitch, int head_dim, int tile_keys, float* probs,
                                         float scale_log2, Allowed allowed) {
    const int lane = threadIdx.x & 31;

    // Scores: s[r][i] = q_r . k_(lane + 32 i).
    float s[kRows][kKeysPerLane];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i) s[r][i] = 0.f;
    for (int d = 0; d < head_dim; ++d) {
      float k[kKeysPerLane];
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i) k[i] = keys[(lane + 32 * i) * k_pitch + d];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < rows) {
          const float q = queries[r * q_pitch + d];  // same address in all lanes: broadcast
#pragma unroll
          for (int i = 0; i < kKeysPerLane; ++i) s[r][i] = fmaf(q, k[i], s[r][i]);
        }
      }
    }

    // Online softmax per row; probabilities go to this warp's scratch.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= rows) continue;
      float tile_max = kNegInf;
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i) {
        const int j = lane + 32 * i;
        s[r][i] = (j < tile_keys && allowed(r, j)) ? s[r][i] * scale_log2 : kNegInf;
        tile_max = fmaxf(tile_max, s[r][i]);
      }
      const float new_max = fmaxf(row_max[r], warp_max(tile_max));
      const bool empty = new_max == kNegInf;  // no allowed key yet: stay empty, no inf - inf
      const float alpha = empty ? 1.f : exp2f(row_max[r] - new_max);
      const float base = empty ? 0.f : new_max;
      float tile_sum = 0.f;
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i) {
        const float p = exp2f(s[r][i] - base);
        probs[r * kTileKeys + lane + 32 * i] = p;
        tile_sum += p;
      }
      row_sum[r] = row_sum[r] * alpha + warp_sum(tile_sum);
      row_max[r] = new_max;
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) acc[r][j] *= alpha;
    }
    __syncwarp();

    // O += P V over the tile's keys. A key a row may not see is skipped, not weighted by
    // its probability 0: 0 x NaN (or inf) in its value would still be NaN.
    for (int j = 0; j < tile_keys; ++j) {
      float v[kColsPerLane];
#pragma unroll
      for (int i = 0; i < kColsPerLane; ++i) {
        const int d = lane + 32 * i;
        v[i] = d < head_dim ? values[j * v_pitch + d] : 0.f;
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < rows && allowed(r, j)) {
          const float p = probs[r * kTileKeys + j];  // broadcast
#pragma unroll
          for (int i = 0; i < kColsPerLane; ++i) acc[r][i] = fmaf(p, v[i], acc[r][i]);
        }
      }
    }
    __syncwarp();  // probs is rewritten by the next call
  }
};

// Stages `rows` rows of head_dim elements as float32 into dst[r * pitch + d]; rows from
// `rows` to `total_rows` are zero. row_ptr(r) is only called for r < rows. All threads of
// the CTA take part; the caller synchronises.
template <typename T, class RowPtr>
__device__ __forceinline__ void stage_rows_as_float(float* dst, int pitch, int total_rows, int rows, int head_dim,
                                                    RowPtr row_ptr) {
  for (int idx = threadIdx.x; idx < total_rows * head_dim; idx += blockDim.x) {
    const int r = idx / head_dim, d = idx % head_dim;
    dst[r * pitch + d] = r < rows ? to_float(row_ptr(r)[d]) : 0.f;
  }
}

// Stages `tile_keys` key and value rows as float32 into keys[j * k_pitch + d] and
// values[j * v_pitch + d]; rows at or beyond valid_keys are zero. rows(j) returns the
// KeyValueRows of tile key j (called for j < valid_keys only). With vector_loads, each
// thread reads 16 bytes at a time (the caller guarantees 16-byte aligned rows and
// head_dim % (16 / sizeof(T)) == 0). All threads take part; the caller synchronises.
template <typename T, class KeyRows>
__device__ __forceinline__ void stage_tile_as_float(float* keys, int k_pitch, float* values, int v_pitch,
                                                    int tile_keys, int valid_keys, int head_dim, bool vector_loads,
                                                    KeyRows rows) {
  if (vector_loads) {
    constexpr int kVec = 16 / sizeof(T);
    const int chunks = head_dim / kVec;
    for (int idx = threadIdx.x; idx < tile_keys * chunks; idx += blockDim.x) {
      const int j = idx / chunks, d0 = (idx % chunks) * kVec;
      float k[kVec], v[kVec];
      if (j < valid_keys) {
        const KeyValueRows<T> r = rows(j);
        load16_as_float(r.key + d0, k);
        load16_as_float(r.value + d0, v);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) k[i] = v[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        keys[j * k_pitch + d0 + i] = k[i];
        values[j * v_pitch + d0 + i] = v[i];
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < tile_keys * head_dim; idx += blockDim.x) {
      const int j = idx / head_dim, d = idx % head_dim;
      float k = 0.f, v = 0.f;
      if (j < valid_keys) {
        const KeyValueRows<T> r = rows(j);
        k = to_float(r.key[d]);
        v = to_float(r.value[d]);
      }
      keys[j * k_pitch + d] = k;
      values[j * v_pitch + d] = v;
    }
  }
}

}  // namespace cuda
}  // namespace did_engine
