// Warp-level attention on tensor cores (bf16 / fp16 inputs, float32 softmax and
// accumulation), shared by the decode and block-causal kernels.
#pragma once

#include "common.cuh"

namespace did_engine {
namespace cuda {

// A raw bf16/fp16 value is inf or NaN when all its exponent bits are set.
template <typename T>
__device__ __forceinline__ bool is_non_finite_bits(uint16_t x) {
  constexpr uint16_t kExponent = std::is_same_v<T, __nv_bfloat16> ? 0x7F80 : 0x7C00;
  return (x & kExponent) == kExponent;
}

template <typename T>
__device__ __forceinline__ float bits_to_float(uint16_t x) {
  T value;
  memcpy(&value, &x, sizeof(x));
  return to_float(value);
}

// One warp's share of an attention problem: 16 query rows (an "M-tile") against key/value
// tiles that the CTA has staged in shared memory, with an online softmax in float32.
//
// Scores are kept in the log2 domain, s = (q . k) * scale * log2(e), so that exp2f gives
// the exponentials. All state is in registers, distributed like the mma C fragments: with
// g = lane / 4 and c = lane % 4, this lane holds rows g and g + 8 of the M-tile, and of
// each 8-column block the columns 2c and 2c + 1.
//
// K and V fragments come from shared memory through ldmatrix (kLoads = kLdmatrix) or scalar
// loads (kScalar); both give every lane the same registers (see load_key_fragments and
// load_value_fragments), so the results are bit-identical.
template <typename T, int D, FragmentLoads kLoads = FragmentLoads::kLdmatrix>
struct MmaRowTile {
  static_assert(D % 16 == 0, "the tensor-core path needs head_dim % 16 == 0");
  static constexpr int kDSteps = D / 16;  // k-steps of Q K^T (over head_dim)
  static constexpr int kDTiles = D / 8;   // n-tiles of P V (over head_dim)

  uint32_t q[kDSteps][4];  // A fragments of the 16 x D query rows (unscaled)
  float acc[kDTiles][4];   // 16 x D unnormalised output (C fragments)
  float row_max[2];        // running max of rows g, g + 8; -inf until a row sees a key
  float row_sum[2];        // this lane's part of the running denominators of rows g, g + 8

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[dt][i] = 0.f;
    row_max[0] = row_max[1] = kNegInf;
    row_sum[0] = row_sum[1] = 0.f;
  }

  // Loads the M-tile's query rows from global memory. row_ptr(r) returns row r's D
  // elements (4-byte aligned) and is only called for r < valid_rows; the other rows are
  // zero (their outputs are never written).
  template <class RowPtr>
  __device__ __forceinline__ void load_queries(RowPtr row_ptr, int valid_rows) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const T* lo = g < valid_rows ? row_ptr(g) : nullptr;
    const T* hi = g + 8 < valid_rows ? row_ptr(g + 8) : nullptr;
#pragma unroll
    for (int ks = 0; ks < kDSteps; ++ks) {
      const int col = ks * 16 + 2 * c;
      q[ks][0] = lo ? *reinterpret_cast<const uint32_t*>(lo + col) : 0u;
      q[ks][1] = hi ? *reinterpret_cast<const uint32_t*>(hi + col) : 0u;
      q[ks][2] = lo ? *reinterpret_cast<const uint32_t*>(lo + col + 8) : 0u;
      q[ks][3] = hi ? *reinterpret_cast<const uint32_t*>(hi + col + 8) : 0u;
    }
  }

  // Attends to KEYS keys staged in shared memory as raw 16-bit values: key j's D elements
  // at keys + j * pitch, its value at values + j * pitch (keys, values and pitch * 2 bytes
  // multiples of 16: ldmatrix rows). allowed(row, j) tells
  // whether M-tile row `row` (0..15) may see key j (0..KEYS-1); disallowed keys get
  // probability exactly 0.
  //
  // masked: some row may not see some key of the tile that holds real data (a
  // block-causal diagonal tile). The tensor cores multiply the probabilities with every
  // value, and 0 x NaN (or inf) is NaN, so a masked tile takes non-finite values out of
  // the MMA and adds them back, with CUDA-core FMAs, to the rows that see them only.
  // Unmasked tiles may disallow only keys that hold finite values (zero-filled tails).
  template <int KEYS, class Allowed>
  __device__ __forceinline__ void attend(const uint16_t* keys, const uint16_t* values, int pitch, float scale_log2,
                                         Allowed allowed, bool masked = false) {
    static_assert(KEYS % 16 == 0, "keys are processed in steps of 16");
    constexpr int kKeyTiles = KEYS / 8;
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;

    // S = Q K^T; s[nt] is the 16 x 8 block of keys 8nt .. 8nt + 7.
    float s[kKeyTiles][4];
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kDSteps; ++ks) {
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; nt += 2) {
        uint32_t b[2][2];
        load_key_fragments(keys, pitch, ks, nt, b);
        mma_16x8x16<T>(s[nt], q[ks], b[0]);
        mma_16x8x16<T>(s[nt + 1], q[ks], b[1]);
      }
    }

    // Scale and mask; running max per row (the 4 lanes of a row hold its KEYS scores).
    float tile_max[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int half = i >> 1;  // 0: row g, 1: row g + 8
        const int key = nt * 8 + 2 * c + (i & 1);
        s[nt][i] = allowed(g + 8 * half, key) ? s[nt][i] * scale_log2 : kNegInf;
        tile_max[half] = fmaxf(tile_max[half], s[nt][i]);
      }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float m = tile_max[half];
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      const float new_max = fmaxf(row_max[half], m);
      // A row that has seen no allowed key keeps max -inf and sum 0 (no inf - inf).
      const bool empty = new_max == kNegInf;
      alpha[half] = empty ? 1.f : exp2f(row_max[half] - new_max);
      base[half] = empty ? 0.f : new_max;
      row_max[half] = new_max;
    }

    // P = exp2(S - max) (masked scores give exactly 0); rescale what came before.
    float tile_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[nt][i] = exp2f(s[nt][i] - base[i >> 1]);
        tile_sum[i >> 1] += s[nt][i];
      }
    }
    row_sum[0] = row_sum[0] * alpha[0] + tile_sum[0];
    row_sum[1] = row_sum[1] * alpha[1] + tile_sum[1];
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      acc[dt][0] *= alpha[0];
      acc[dt][1] *= alpha[0];
      acc[dt][2] *= alpha[1];
      acc[dt][3] *= alpha[1];
    }

    // O += P V. The C fragments of key blocks 2kk and 2kk + 1 are exactly the A fragment of
    // keys 16kk .. 16kk + 15. Each 32-bit V register (two 16-bit values) passes through
    // value_pair.
    auto accumulate_pv = [&](auto value_pair) {
#pragma unroll
      for (int kk = 0; kk < KEYS / 16; ++kk) {
        const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                               pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dt = 0; dt < kDTiles; dt += 2) {
          uint32_t b[2][2];
          load_value_fragments(values, pitch, kk, dt, b);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const uint32_t filtered[2] = {value_pair(b[i][0]), value_pair(b[i][1])};
            mma_16x8x16<T>(acc[dt + i], a, filtered);
          }
        }
      }
    };
    if (!masked) {
      accumulate_pv([](uint32_t pair) { return pair; });
      return;
    }

    // Masked: the same MMA with every non-finite value replaced by 0 (a row that does not
    // see it then adds exactly what it adds for a finite value: p = 0 times a number).
    bool any_non_finite = false;
    accumulate_pv([&](uint32_t pair) -> uint32_t {
      const bool lo_bad = is_non_finite_bits<T>(static_cast<uint16_t>(pair & 0xFFFFu));
      const bool hi_bad = is_non_finite_bits<T>(static_cast<uint16_t>(pair >> 16));
      any_non_finite |= lo_bad || hi_bad;
      return (lo_bad ? 0u : pair & 0xFFFFu) | (hi_bad ? 0u : pair & 0xFFFF0000u);
    });
    if (!__any_sync(0xffffffffu, any_non_finite)) return;

    // The non-finite values, added to the rows that see them. This lane holds output
    // columns 8dt + 2c, +1 of rows g and g + 8; P[row][key] lives in lane 4 * row' + (key
    // % 8) / 2 (row' = row mod 8), register s[key / 8][(key % 2) + 2 * (row >= 8)].
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
      for (int j = 0; j < 8; ++j) {
        const int key = nt * 8 + j, src = 4 * g + (j >> 1);
        const float p_lo = __shfl_sync(0xffffffffu, (j & 1) ? s[nt][1] : s[nt][0], src);
        const float p_hi = __shfl_sync(0xffffffffu, (j & 1) ? s[nt][3] : s[nt][2], src);
        const bool sees_lo = allowed(g, key), sees_hi = allowed(g + 8, key);
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const uint16_t x = values[key * pitch + dt * 8 + 2 * c + i];
            if (!is_non_finite_bits<T>(x)) continue;
            const float v = bits_to_float<T>(x);
            if (sees_lo) acc[dt][i] = fmaf(p_lo, v, acc[dt][i]);
            if (sees_hi) acc[dt][2 + i] = fmaf(p_hi, v, acc[dt][2 + i]);
          }
        }
      }
    }
  }

  // B fragments of K^T for key blocks nt and nt + 1 (8 keys each) and head_dim columns
  // 16ks .. 16ks + 15: b[i][0] = K[8(nt + i) + g][16ks + 2c, +1], b[i][1] the same 8
  // columns further (the mma B layout with B = K^T: one key row, two adjacent elements).
  // ldmatrix: matrix m = 2i + h (landing in b[i][h]) is keys 8(nt + i) .. + 7 (its rows) by
  // columns 16ks + 8h .. + 7, and the plain layout gives exactly these registers. Lane l
  // addresses row l % 8 of matrix l / 8.
  __device__ __forceinline__ static void load_key_fragments(const uint16_t* keys, int pitch, int ks, int nt,
                                                            uint32_t (&b)[2][2]) {
    const int lane = threadIdx.x & 31;
    if constexpr (kLoads == FragmentLoads::kLdmatrix) {
      const int m = lane >> 3;
      const int key = 8 * (nt + (m >> 1)) + (lane & 7);
      ldmatrix_x4<false>(b, keys + key * pitch + 16 * ks + 8 * (m & 1));
    } else {
      const int g = lane >> 2, c = lane & 3;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const uint16_t* key_row = keys + (8 * (nt + i) + g) * pitch + 16 * ks + 2 * c;
        b[i][0] = *reinterpret_cast<const uint32_t*>(key_row);
        b[i][1] = *reinterpret_cast<const uint32_t*>(key_row + 8);
      }
    }
  }

  // B fragments of V for keys 16kk .. 16kk + 15 and head_dim columns 8(dt + i) + g:
  // b[i][0] = V[16kk + 2c, +1][8(dt + i) + g] (two key rows of one column), b[i][1] the same
  // for keys 16kk + 8 + 2c, +1. ldmatrix .trans: matrix m = 2i + h (landing in b[i][h]) is
  // keys 16kk + 8h .. + 7 (its rows, as stored) by columns 8(dt + i) .. + 7; transposed,
  // lane (g, c) gets rows 2c, 2c + 1 of column g: exactly these registers.
  __device__ __forceinline__ static void load_value_fragments(const uint16_t* values, int pitch, int kk, int dt,
                                                              uint32_t (&b)[2][2]) {
    const int lane = threadIdx.x & 31;
    if constexpr (kLoads == FragmentLoads::kLdmatrix) {
      const int m = lane >> 3;
      const int key = 16 * kk + 8 * (m & 1) + (lane & 7);
      ldmatrix_x4<true>(b, values + key * pitch + 8 * (dt + (m >> 1)));
    } else {
      const int g = lane >> 2, c = lane & 3;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const uint16_t* v = values + (16 * kk + 2 * c) * pitch + 8 * (dt + i) + g;
        b[i][0] = uint32_t(v[0]) | (uint32_t(v[pitch]) << 16);
        b[i][1] = uint32_t(v[8 * pitch]) | (uint32_t(v[9 * pitch]) << 16);
      }
    }
  }

  // Completes the row sums over the 4 lanes that share each row (call once, at the end).
  __device__ __forceinline__ void reduce_row_sums() {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 1);
      row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 2);
    }
  }

  // Calls emit(row, col, x, y) with this lane's accumulator pairs acc[row][col, col + 1]
  // and each row's `half` (0 for row g, 1 for row g + 8) via row >= 8.
  template <class Emit>
  __device__ __forceinline__ void for_each_acc_pair(Emit emit) const {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      emit(g, dt * 8 + 2 * c, acc[dt][0], acc[dt][1]);
      emit(g + 8, dt * 8 + 2 * c, acc[dt][2], acc[dt][3]);
    }
  }
};

// Stages `tile_keys` key and value rows of D 16-bit elements into shared memory with
// cp.async (16 bytes per copy), rows `pitch` elements apart. rows(j) returns {key row,
// value row} of tile key j and is only called for j < valid_keys; rows at or beyond it
// are zero-filled. All threads of the CTA take part; the caller commits and waits.
template <typename T, int D, class KeyRows>
__device__ __forceinline__ void stage_tile_async(uint16_t* keys, uint16_t* values, int pitch, int tile_keys,
                                                 int valid_keys, const T* fallback_row, KeyRows rows) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int idx = threadIdx.x; idx < tile_keys * kChunks; idx += blockDim.x) {
    const int j = idx / kChunks, col = (idx % kChunks) * 8;
    const bool valid = j < valid_keys;
    const T* k_src = fallback_row;
    const T* v_src = fallback_row;
    if (valid) {
      const auto r = rows(j);
      k_src = r.key;
      v_src = r.value;
    }
    cp_async_16(keys + j * pitch + col, k_src + col, valid);
    cp_async_16(values + j * pitch + col, v_src + col, valid);
  }
}

}  // namespace cuda
}  // namespace did_engine
