// Shared pieces of the CPU attention kernels (block_decode_attention,
// block_causal_attention): float32 micro-kernels over a tile of keys, the online-softmax
// state of the query rows of each kv head, staging of key/value tiles, and a scheduler.
//
// Vocabulary. An *item* of work is a set of query rows per kv head (all of them attend to
// that head's keys) and a key range. Keys are consumed in tiles of kKeyTile: for every
// tile, scores -> online-softmax update -> P.V, for every kv head in turn.
//
// Every row of head_dim values is handled as dp floats (head_dim rounded up to the SIMD
// width, zero padded), so inner loops have no tails. The accumulators are row-major
// [rows, dp]. The queries and the score tile come in one of two layouts, chosen per item
// by the number of rows per head:
//   - few rows (<= one SIMD vector of them, e.g. 4 queries of plain multi-head
//     attention): queries row-major [rows, dp], scores [rows, tile]. A score is a dot
//     product over dp, reduced horizontally once per (row, key); this wastes nothing on
//     padding rows and needs no transposes.
//   - more rows: queries transposed [dp, rows_padded] (rows padded to two vectors),
//     scores [tile, rows_padded]. Scores are broadcast-FMA GEMM tiles (one key element
//     times a vector of rows) with no horizontal reductions, and the softmax runs down
//     vectors of rows. This is ~1.4x faster per FLOP than the dot form.
// P.V is the same in both: broadcast a probability, FMA a row of V into the accumulator.
//
// bf16/fp16 keys and values are widened to float32 in registers as the row-major score
// kernel and P.V load them; only what the transposed score kernel broadcasts (keys of
// many-row items) and rows that need padding are first staged as a float32 tile.
// Scores, softmax and accumulation are float32 throughout.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace did_engine::cpu_attention {

// Fully unrolls a loop with a small constant trip count early enough that its arrays of
// vectors become registers.
#if defined(__GNUC__)
#define DID_UNROLL _Pragma("GCC unroll 16")
#else
#define DID_UNROLL
#endif

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// Keys per online-softmax step: enough to amortise the per-row rescale and the
// horizontal reductions, few enough that a head's key tile stays in L1.
constexpr int64_t kKeyTile = 32;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// The kernels index rows with strides but read each row as a contiguous run.

// ---------------------------------------------------------------------------------------
// Loads, conversions, reductions.

inline Vec load_float(const float* p) { return Vec::loadu(p); }

// kLanes bf16/fp16 values -> float32 (one 128-bit load and a widening on AVX2).
template <typename T>
inline Vec load_float(const T* p) {
  Vec v;
  at::vec::load_to_float<T>(p, v);
  return v;
}

// dst[0:dp] = float(src[0:d]), zero padded past d.
template <typename T>
inline void row_to_float(const T* src, int64_t d, int64_t dp, float* dst) {
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) load_float(src + c).store(dst + c);
  for (; c < d; ++c) dst[c] = static_cast<float>(src[c]);
  for (; c < dp; ++c) dst[c] = 0.f;
}

// dst[0:d] = T(src[0:d] * mult); rounding to bf16/fp16 happens once, here.
template <typename T>
inline void float_row_to(const float* src, float mult, int64_t d, T* dst) {
  for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<T>(src[c] * mult);
}

template <>
inline void float_row_to<float>(const float* src, float mult, int64_t d, float* dst) {
  const Vec mult_vec(mult);
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) (Vec::loadu(src + c) * mult_vec).store(dst + c);
  for (; c < d; ++c) dst[c] = src[c] * mult;
}

inline float hsum(const Vec& a) {
  return at::vec::vec_reduce_all<float>([](const Vec& x, const Vec& y) { return x + y; }, a);
}

inline float hmax(const Vec& a) {
  return at::vec::vec_reduce_all<float>([](const Vec& x, const Vec& y) { return at::vec::maximum(x, y); }, a);
}

// out[0..3] = horizontal sums of a, b, c, d (one hadd tree instead of four reductions).
inline void hsum4(const Vec& a, const Vec& b, const Vec& c, const Vec& d, float* out) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 ab = _mm256_hadd_ps(a, b);      // per 128-bit half: a a b b
  const __m256 cd = _mm256_hadd_ps(c, d);      // c c d d
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // a b c d (one partial sum per half)
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
#else
  out[0] = hsum(a);
  out[1] = hsum(b);
  out[2] = hsum(c);
  out[3] = hsum(d);
#endif
}

// Pins a value to a register. Without it GCC re-reads a reused operand from memory in
// every FMA that uses it (memory operands), which makes the kernels load-bound.
inline void keep_in_register(Vec& v) {
#if defined(CPU_CAPABILITY_AVX2) && defined(__GNUC__)
  __m256 raw = v;
  asm("" : "+x"(raw));
  v = raw;
#else
  (void)v;
#endif
}

// ---------------------------------------------------------------------------------------
// Scores, few rows: s[r * lds + t] = dot(q_r, k_t), queries row-major [rows, dp]. Keys
// may be float32 or bf16/fp16 (converted in registers as they are loaded, once per
// block of rows).

// Horizontal sums of n accumulators; sum i goes to s[row(i) * lds + key(i)] with
// i = row * KEYS + key.
template <int KEYS, int N>
inline void reduce_scores(const Vec (&acc)[N], float* s, int64_t lds) {
  int i = 0;
  for (; i + 4 <= N; i += 4) {
    float sums[4];
    hsum4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3], sums);
    for (int j = 0; j < 4; ++j) s[(i + j) / KEYS * lds + (i + j) % KEYS] = sums[j];
  }
  for (; i < N; ++i) s[i / KEYS * lds + i % KEYS] = hsum(acc[i]);
}

// ROWS query rows x KEYS keys: ROWS * KEYS accumulators; per SIMD chunk of the head dim,
// KEYS + ROWS loads for ROWS * KEYS FMAs.
template <typename T, int ROWS, int KEYS>
inline void dot_block(const float* q, int64_t ldq, const T* k, int64_t ldk, int64_t dp, float* s, int64_t lds) {
  Vec acc[ROWS * KEYS];
  for (int i = 0; i < ROWS * KEYS; ++i) acc[i] = Vec(0.f);
  for (int64_t c = 0; c < dp; c += kLanes) {
    Vec kc[KEYS];
    for (int t = 0; t < KEYS; ++t) {
      kc[t] = load_float(k + t * ldk + c);
      keep_in_register(kc[t]);
    }
    for (int r = 0; r < ROWS; ++r) {
      const Vec qr = Vec::loadu(q + r * ldq + c);
      for (int t = 0; t < KEYS; ++t) acc[r * KEYS + t] = at::vec::fmadd(qr, kc[t], acc[r * KEYS + t]);
    }
  }
  reduce_scores<KEYS>(acc, s, lds);
}

// ROWS rows against `keys` keys, KEYS at a time.
template <typename T, int ROWS, int KEYS>
inline void dot_rows(const float* q, int64_t ldq, const T* k, int64_t ldk, int64_t keys, int64_t dp, float* s,
                     int64_t lds) {
  int64_t t = 0;
  for (; t + KEYS <= keys; t += KEYS) dot_block<T, ROWS, KEYS>(q, ldq, k + t * ldk, ldk, dp, s + t, lds);
  for (; t < keys; ++t) dot_block<T, ROWS, 1>(q, ldq, k + t * ldk, ldk, dp, s + t, lds);
}

// s [rows, lds] = q [rows, dp] . k [keys, ldk]^T. Blocks of 4 rows x 2 keys convert each
// key chunk once for 4 rows; the last 1-3 rows go 2 x 4 / 1 x 4.
template <typename T>
inline void scores_row_major(const float* q, int64_t rows, const T* k, int64_t ldk, int64_t keys, int64_t dp,
                             float* s, int64_t lds) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) dot_rows<T, 4, 2>(q + r * dp, dp, k, ldk, keys, dp, s + r * lds, lds);
  for (; r + 2 <= rows; r += 2) dot_rows<T, 2, 4>(q + r * dp, dp, k, ldk, keys, dp, s + r * lds, lds);
  if (r < rows) dot_rows<T, 1, 4>(q + r * dp, dp, k, ldk, keys, dp, s + r * lds, lds);
}

// ---------------------------------------------------------------------------------------
// Scores, many rows: st[t * ldst + r] = sum_d k[t, d] * qt[d, r], queries transposed.

// KEYS keys x two vectors of rows: broadcast k[t, d], FMA into the row vectors.
template <int KEYS>
inline void bcast_keys_2vec(const float* k, int64_t ldk, const float* qt, int64_t ldq, int64_t dp, float* st,
                            int64_t ldst) {
  Vec acc[KEYS][2];
  for (int t = 0; t < KEYS; ++t) acc[t][0] = acc[t][1] = Vec(0.f);
  for (int64_t d = 0; d < dp; ++d) {
    Vec q0 = Vec::loadu(qt + d * ldq), q1 = Vec::loadu(qt + d * ldq + kLanes);
    keep_in_register(q0), keep_in_register(q1);
    for (int t = 0; t < KEYS; ++t) {
      const Vec kb(k[t * ldk + d]);
      acc[t][0] = at::vec::fmadd(kb, q0, acc[t][0]);
      acc[t][1] = at::vec::fmadd(kb, q1, acc[t][1]);
    }
  }
  for (int t = 0; t < KEYS; ++t) {
    acc[t][0].store(st + t * ldst);
    acc[t][1].store(st + t * ldst + kLanes);
  }
}

// st [keys, rows_padded] = k [keys, ldk] . qt [dp, rows_padded]; rows_padded is a
// multiple of 2 * kLanes.
inline void scores_transposed(const float* k, int64_t ldk, int64_t keys, const float* qt, int64_t rows_padded,
                              int64_t dp, float* st) {
  for (int64_t r = 0; r < rows_padded; r += 2 * kLanes) {
    int64_t t = 0;
    for (; t + 4 <= keys; t += 4)
      bcast_keys_2vec<4>(k + t * ldk, ldk, qt + r, rows_padded, dp, st + t * rows_padded + r, rows_padded);
    const float* k_t = k + t * ldk;
    float* st_t = st + t * rows_padded + r;
    switch (keys - t) {
      case 3: bcast_keys_2vec<3>(k_t, ldk, qt + r, rows_padded, dp, st_t, rows_padded); break;
      case 2: bcast_keys_2vec<2>(k_t, ldk, qt + r, rows_padded, dp, st_t, rows_padded); break;
      case 1: bcast_keys_2vec<1>(k_t, ldk, qt + r, rows_padded, dp, st_t, rows_padded); break;
      default: break;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Online softmax. Each turns a score tile into probabilities relative to the rows' new
// running max, updates max and sum, and writes alpha[r] = exp(old max - new max), the
// factor the row's accumulator must be scaled by.
//
// A row whose scores so far are all -inf (an -inf key, or a fully masked tile) keeps max
// -inf and sum 0: exponentials are taken relative to 0 instead of -inf, since -inf - -inf
// would be NaN and poison the row for its later, finite keys.

inline Vec finite_base(const Vec& max) { return Vec::blendv(max, Vec(0.f), max == Vec(kNegInf)); }
inline float finite_base(float max) { return max == kNegInf ? 0.f : max; }

// Scores row-major s [rows, lds], first `keys` columns valid.
inline void softmax_row_major(float* s, int64_t lds, int64_t rows, int64_t keys, float* row_max, float* row_sum,
                              float* alpha) {
  const int64_t keys_padded = round_up(keys, kLanes);
  for (int64_t r0 = 0; r0 < rows; r0 += kLanes) {
    const int64_t n = std::min(kLanes, rows - r0);
    float tile_max[kLanes];
    for (int64_t i = 0; i < n; ++i) {
      float* sr = s + (r0 + i) * lds;
      // Padding lanes get -inf so that they vanish from the max and give p = 0.
      for (int64_t t = keys; t < keys_padded; ++t) sr[t] = kNegInf;
      Vec m = Vec::loadu(sr);
      for (int64_t t = kLanes; t < keys_padded; t += kLanes) m = at::vec::maximum(m, Vec::loadu(sr + t));
      tile_max[i] = hmax(m);
    }
    // Lanes past n load as 0 and give alpha = 1; they are never stored.
    const Vec old_max = Vec::loadu(row_max + r0, n);
    const Vec new_max = at::vec::maximum(old_max, Vec::loadu(tile_max, n));
    (old_max - finite_base(new_max)).exp_u20().store(alpha + r0, n);  // 0 on a row's first tile (old = -inf)
    new_max.store(row_max + r0, n);
    for (int64_t i = 0; i < n; ++i) {
      float* sr = s + (r0 + i) * lds;
      const Vec m(finite_base(row_max[r0 + i]));
      Vec sum(0.f);
      for (int64_t t = 0; t < keys_padded; t += kLanes) {
        const Vec p = (Vec::loadu(sr + t) - m).exp_u20();
        p.store(sr + t);
        sum = sum + p;
      }
      row_sum[r0 + i] = row_sum[r0 + i] * alpha[r0 + i] + hsum(sum);
    }
  }
}

// Scores transposed st [keys, rows_padded]: every step works on a vector of rows.
inline void softmax_transposed(float* st, int64_t rows_padded, int64_t keys, float* row_max, float* row_sum,
                               float* alpha) {
  for (int64_t r = 0; r < rows_padded; r += kLanes) {
    float* col = st + r;
    Vec tile_max = Vec::loadu(col);
    for (int64_t t = 1; t < keys; ++t) tile_max = at::vec::maximum(tile_max, Vec::loadu(col + t * rows_padded));
    const Vec old_max = Vec::loadu(row_max + r);
    const Vec new_max = at::vec::maximum(old_max, tile_max);
    const Vec base = finite_base(new_max);
    const Vec scale = (old_max - base).exp_u20();
    Vec sum(0.f);
    for (int64_t t = 0; t < keys; ++t) {
      const Vec p = (Vec::loadu(col + t * rows_padded) - base).exp_u20();
      p.store(col + t * rows_padded);
      sum = sum + p;
    }
    at::vec::fmadd(Vec::loadu(row_sum + r), scale, sum).store(row_sum + r);
    new_max.store(row_max + r);
    scale.store(alpha + r);
  }
}

// acc[r, :] *= alpha[r], skipping the (common) rows whose max did not move.
inline void rescale_rows(float* acc, int64_t dp, int64_t rows, const float* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    if (alpha[r] == 1.f) continue;
    const Vec a(alpha[r]);
    float* row = acc + r * dp;
    for (int64_t c = 0; c < dp; c += kLanes) (Vec::loadu(row + c) * a).store(row + c);
  }
}

// ---------------------------------------------------------------------------------------
// Masks (block-causal diagonal tiles). Row r may see keys < key_end[r]; key_end is
// non-decreasing in r. The tile holds keys [t0, t0 + keys).

inline void mask_row_major(float* s, int64_t lds, int64_t rows, int64_t t0, int64_t keys, const int64_t* key_end) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t visible = std::max<int64_t>(0, key_end[r] - t0);
    for (int64_t t = visible; t < keys; ++t) s[r * lds + t] = kNegInf;
  }
}

inline void mask_transposed(float* st, int64_t rows_padded, int64_t rows, int64_t t0, int64_t keys,
                            const int64_t* key_end) {
  int64_t first_seeing = 0;  // rows below it do not see key t0 + t
  for (int64_t t = 0; t < keys; ++t) {
    while (first_seeing < rows && key_end[first_seeing] <= t0 + t) ++first_seeing;
    std::fill(st + t * rows_padded, st + t * rows_padded + first_seeing, kNegInf);
  }
}

// ---------------------------------------------------------------------------------------
// P.V: acc[r, :] += sum_t p(r, t) * v[t, :] with p(r, t) = p[r * p_row + t * p_key]
// (either score layout), broadcasting p and FMA-ing rows of V.

// ROWS rows x CH vectors of the head dim.
template <typename T, int ROWS, int CH>
inline void pv_block(const float* p, int64_t p_row, int64_t p_key, const T* v, int64_t ldv, int64_t keys,
                     float* acc, int64_t ldacc) {
  // A flat array (a[r * CH + j]): GCC keeps it in registers, where a 2-D one went through
  // the stack every iteration.
  Vec a[ROWS * CH];
  DID_UNROLL for (int i = 0; i < ROWS * CH; ++i) a[i] = Vec::loadu(acc + i / CH * ldacc + i % CH * kLanes);
  for (int64_t t = 0; t < keys; ++t) {
    Vec vt[CH];
    DID_UNROLL for (int j = 0; j < CH; ++j) vt[j] = load_float(v + t * ldv + j * kLanes);
    DID_UNROLL for (int r = 0; r < ROWS; ++r) {
      const Vec pr(p[r * p_row + t * p_key]);
      DID_UNROLL for (int j = 0; j < CH; ++j) a[r * CH + j] = at::vec::fmadd(pr, vt[j], a[r * CH + j]);
    }
  }
  DID_UNROLL for (int i = 0; i < ROWS * CH; ++i) a[i].store(acc + i / CH * ldacc + i % CH * kLanes);
}

template <typename T, int ROWS>
inline void pv_rows(const float* p, int64_t p_row, int64_t p_key, const T* v, int64_t ldv, int64_t keys,
                    int64_t dp, float* acc) {
  int64_t c = 0;
  for (; c + 2 * kLanes <= dp; c += 2 * kLanes) pv_block<T, ROWS, 2>(p, p_row, p_key, v + c, ldv, keys, acc + c, dp);
  if (c < dp) pv_block<T, ROWS, 1>(p, p_row, p_key, v + c, ldv, keys, acc + c, dp);
}

// acc [rows, dp] += P . v [keys, ldv]
template <typename T>
inline void tile_pv(const float* p, int64_t p_row, int64_t p_key, int64_t rows, const T* v, int64_t ldv,
                    int64_t keys, int64_t dp, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) pv_rows<T, 4>(p + r * p_row, p_row, p_key, v, ldv, keys, dp, acc + r * dp);
  const float* p_r = p + r * p_row;
  float* acc_r = acc + r * dp;
  switch (rows - r) {
    case 3: pv_rows<T, 3>(p_r, p_row, p_key, v, ldv, keys, dp, acc_r); break;
    case 2: pv_rows<T, 2>(p_r, p_row, p_key, v, ldv, keys, dp, acc_r); break;
    case 1: pv_rows<T, 1>(p_r, p_row, p_key, v, ldv, keys, dp, acc_r); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------
// Scratch memory.

// A float buffer owned by the calling thread and reused by later calls (slot: which of
// the thread's buffers). Fresh allocations of this size would be mmap'ed and page-faulted
// on every call, which costs tens of microseconds on small problems. At most one user of
// a slot per thread at a time.
template <int kSlot>
inline float* thread_buffer(int64_t floats) {
  thread_local std::unique_ptr<float[]> storage;
  thread_local int64_t capacity = 0;
  if (capacity < floats) {
    storage.reset();  // release before allocating the larger one
    storage.reset(new float[floats]);
    capacity = floats;
  }
  return storage.get();
}

// A 64-byte aligned float region of the thread's workspace buffer, carved into regions.
class Scratch {
 public:
  explicit Scratch(int64_t floats) {
    float* base = thread_buffer<0>(floats + kAlignFloats);
    const auto addr = reinterpret_cast<std::uintptr_t>(base);
    next_ = base + (round_up(static_cast<int64_t>(addr), 64) - static_cast<int64_t>(addr)) / 4;
  }
  // Regions are rounded to 64 bytes so that each starts aligned.
  static int64_t region(int64_t floats) { return round_up(floats, kAlignFloats); }
  float* take(int64_t floats) {
    float* p = next_;
    next_ += region(floats);
    return p;
  }

 private:
  static constexpr int64_t kAlignFloats = 16;
  float* next_;
};

// The rows of one work item, for every kv head: queries (in the item's layout),
// row-major accumulators and softmax state; plus the tiles. Allocated once per task for
// the largest item.
class HeadsWorkspace {
 public:
  HeadsWorkspace(int64_t heads, int64_t max_rows, int64_t dp)
      : heads_(heads),
        dp_(dp),
        rows_cap_(round_up(std::max<int64_t>(max_rows, 1), 2 * kLanes)),
        scratch_(heads * (2 * Scratch::region(rows_cap_ * dp) + 2 * Scratch::region(rows_cap_) +
                          Scratch::region(rows_cap_ * kKeyTile) + Scratch::region(kKeyTile * dp)) +
                 Scratch::region(rows_cap_)) {
    q_ = scratch_.take(heads * rows_cap_ * dp);
    acc_ = scratch_.take(heads * rows_cap_ * dp);
    row_max_ = scratch_.take(heads * rows_cap_);
    row_sum_ = scratch_.take(heads * rows_cap_);
    scores_ = scratch_.take(heads * rows_cap_ * kKeyTile);
    kv_tile_ = scratch_.take(heads * kKeyTile * dp);
    alpha_ = scratch_.take(rows_cap_);
  }

  // Starts an item of `rows` rows per head: picks the layout, clears the state.
  void begin(int64_t rows) {
    rows_ = rows;
    transposed_ = rows > kLanes;
    rows_padded_ = transposed_ ? round_up(rows, 2 * kLanes) : rows;
    if (transposed_) std::fill(q_, q_ + heads_ * rows_cap_ * dp_, 0.f);  // padding rows stay 0
    reset_state();
  }

  // Clears the accumulators and softmax state, keeping the queries (the next key range of
  // the same rows starts from scratch).
  void reset_state() {
    for (int64_t g = 0; g < heads_; ++g) {
      std::fill(acc(g), acc(g) + rows_ * dp_, 0.f);
      std::fill(row_max(g), row_max(g) + rows_padded_, kNegInf);
      std::fill(row_sum(g), row_sum(g) + rows_padded_, 0.f);
    }
  }

  // Query row r of head g = src[0:d] * scale.
  template <typename T>
  void set_query(int64_t g, int64_t r, const T* src, int64_t d, float scale) {
    float* q = q_ + g * rows_cap_ * dp_;
    if (!transposed_) {
      float* row = q + r * dp_;
      int64_t c = 0;
      const Vec scale_vec(scale);
      for (; c + kLanes <= d; c += kLanes) (load_float(src + c) * scale_vec).store(row + c);
      for (; c < d; ++c) row[c] = static_cast<float>(src[c]) * scale;
      for (; c < dp_; ++c) row[c] = 0.f;
    } else {
      for (int64_t c = 0; c < d; ++c) q[c * rows_padded_ + r] = static_cast<float>(src[c]) * scale;
    }
  }

  // One tile: keys k_f [keys, ldk] (float) against head g's rows, masked by key_end
  // (may be null) for keys [t0, t0 + keys). Leaves the probabilities in the head's score
  // tile and rescales its accumulators.
  // Whether keys of type T can be used as they are (else they must be staged as float32):
  // the row-major kernels convert bf16/fp16 in registers, the transposed ones broadcast
  // single float32 elements; padding always needs staging.
  template <typename T>
  bool reads_keys_in_place(int64_t d) const {
    return d == dp_ && (std::is_same_v<T, float> || !transposed_);
  }
  // Same for values: P.V converts in registers in both layouts.
  bool reads_values_in_place(int64_t d) const { return d == dp_; }

  // One tile: keys k [keys, ldk] against head g's rows, masked by key_end (may be null)
  // for keys [t0, t0 + keys). Leaves the probabilities in the head's score tile and
  // rescales its accumulators.
  template <typename T>
  void scores_and_softmax(int64_t g, const T* k, int64_t ldk, int64_t t0, int64_t keys, const int64_t* key_end) {
    float* s = scores(g);
    const bool masked = key_end != nullptr && key_end[0] < t0 + keys;
    if (transposed_) {
      if constexpr (std::is_same_v<T, float>) {
        scores_transposed(k, ldk, keys, q_ + g * rows_cap_ * dp_, rows_padded_, dp_, s);
        if (masked) mask_transposed(s, rows_padded_, rows_, t0, keys, key_end);
        softmax_transposed(s, rows_padded_, keys, row_max(g), row_sum(g), alpha_);
      } else {
        TORCH_INTERNAL_ASSERT(false, "transposed scores need float32 keys");
      }
    } else {
      scores_row_major(q_ + g * rows_cap_ * dp_, rows_, k, ldk, keys, dp_, s, kKeyTile);
      if (masked) mask_row_major(s, kKeyTile, rows_, t0, keys, key_end);
      softmax_row_major(s, kKeyTile, rows_, keys, row_max(g), row_sum(g), alpha_);
    }
    rescale_rows(acc(g), dp_, rows_, alpha_);
  }

  // acc(g) += P . v [keys, ldv] with the probabilities left by scores_and_softmax, for
  // keys [t0, t0 + keys) masked by key_end (may be null) as there.
  //
  // A masked key's value never enters the sum of a row that does not see it: its weight
  // is 0, but 0 x NaN or 0 x inf would still be NaN. In a masked tile each run of rows
  // with the same visible count (key_end is non-decreasing) takes only its visible keys;
  // a row's own additions are the same as in an unmasked tile, minus the zero terms.
  template <typename T>
  void accumulate_pv(int64_t g, const T* v, int64_t ldv, int64_t t0, int64_t keys, const int64_t* key_end) {
    const int64_t p_row = transposed_ ? 1 : kKeyTile, p_key = transposed_ ? rows_padded_ : 1;
    const float* p = scores(g);
    if (key_end == nullptr || key_end[0] >= t0 + keys) {
      tile_pv(p, p_row, p_key, rows_, v, ldv, keys, dp_, acc(g));
      return;
    }
    auto visible = [&](int64_t r) { return std::clamp<int64_t>(key_end[r] - t0, 0, keys); };
    for (int64_t r0 = 0, r1 = 0; r0 < rows_; r0 = r1) {
      const int64_t seen = visible(r0);
      for (r1 = r0 + 1; r1 < rows_ && visible(r1) == seen;) ++r1;
      if (seen > 0) tile_pv(p + r0 * p_row, p_row, p_key, r1 - r0, v, ldv, seen, dp_, acc(g) + r0 * dp_);
    }
  }

  int64_t heads() const { return heads_; }
  int64_t rows() const { return rows_; }
  int64_t dp() const { return dp_; }
  float* acc(int64_t g) { return acc_ + g * rows_cap_ * dp_; }
  float* row_max(int64_t g) { return row_max_ + g * rows_cap_; }
  float* row_sum(int64_t g) { return row_sum_ + g * rows_cap_; }
  // Head g's slot of the key/value tile [kKeyTile, dp].
  float* kv_tile(int64_t g) { return kv_tile_ + g * kKeyTile * dp_; }

 private:
  float* scores(int64_t g) { return scores_ + g * rows_cap_ * kKeyTile; }

  int64_t heads_, dp_, rows_cap_;
  Scratch scratch_;
  float *q_, *acc_, *row_max_, *row_sum_, *scores_, *kv_tile_, *alpha_;
  int64_t rows_ = 0, rows_padded_ = 0;
  bool transposed_ = false;
};

// ---------------------------------------------------------------------------------------
// Streaming keys through the rows of every head.

// Keys and values of every kv head of one sequence: key t of head g is at
// k + t * k_key_stride + g * k_head_stride (values likewise).
template <typename T>
struct HeadKeys {
  const T* k;
  const T* v;
  int64_t k_key_stride, k_head_stride;
  int64_t v_key_stride, v_head_stride;
};

// dst(g)[t, :] = float(rows[t, g, :]) for n_keys keys and all heads of a tile, read in
// memory order (key-major, then head).
template <typename T>
inline void stage_tile(const T* rows, int64_t key_stride, int64_t head_stride, int64_t n_keys, int64_t d,
                       HeadsWorkspace& ws) {
  for (int64_t t = 0; t < n_keys; ++t)
    for (int64_t g = 0; g < ws.heads(); ++g)
      row_to_float(rows + t * key_stride + g * head_stride, d, ws.dp(), ws.kv_tile(g) + t * ws.dp());
}

// Software prefetch of part `part` of `parts` of a byte range, so that the prefetches of
// the next tile spread over the compute of the current one instead of stalling it in one
// burst. (Measured here: without it, two threads streaming a large cache reach well under
// half the memory bandwidth; prefetcht0 beats the L2-only hints by ~10%.)
inline void prefetch_part(const void* base, int64_t bytes, int64_t part, int64_t parts) {
#if defined(__GNUC__)
  const char* p = static_cast<const char*>(base);
  const int64_t lines = ceil_div(bytes, 64);
  for (int64_t l = lines * part / parts; l < lines * (part + 1) / parts; ++l) __builtin_prefetch(p + l * 64, 0, 3);
#else
  (void)base, (void)bytes, (void)part, (void)parts;
#endif
}

// Keys [begin, end) of every kv head go once through that head's rows in `ws`, a tile at
// a time: scores and softmax for every head, then P.V for every head. `key_end` (null:
// no mask) limits what each row sees (see mask_*).
//
// Memory access. In the usual [seq, heads, head_dim] layout, a head's keys are one row
// of head_dim values per key row of all heads, so walking one head at a time would jump
// across pages every key or two, and the hardware prefetchers lose the stream. Instead,
// while one tile is computed, the next tile of every head (one contiguous run of memory)
// is prefetched in memory order, a slice per head computed. float32 rows with no padding
// are then read in place; other rows are staged (converted to float32, padded) for all
// heads at once, in memory order.
template <typename T>
void attend_heads(HeadsWorkspace& ws, const HeadKeys<T>& keys, int64_t begin, int64_t end, int64_t d,
                  const int64_t* key_end) {
  const int64_t dp = ws.dp(), heads = ws.heads();
  if (ws.rows() == 0) return;
  const bool k_in_place = ws.reads_keys_in_place<T>(d);
  const bool v_in_place = ws.reads_values_in_place(d);
  // Prefetch when every head of a key sits inside its key row (a tile is then one run).
  constexpr int64_t kMaxPrefetchRowBytes = 1 << 16;
  auto interleaved = [&](int64_t key_stride, int64_t head_stride) {
    return head_stride >= 0 && (heads - 1) * head_stride + d <= key_stride &&
           key_stride * static_cast<int64_t>(sizeof(T)) <= kMaxPrefetchRowBytes;
  };
  const bool prefetch_k = interleaved(keys.k_key_stride, keys.k_head_stride);
  const bool prefetch_v = interleaved(keys.v_key_stride, keys.v_head_stride);

  // Tiles of equal size (a multiple of 4 keys, at most kKeyTile): no short last tile that
  // would pay a whole tile's fixed costs for a few keys.
  const int64_t n_tiles = ceil_div(end - begin, kKeyTile);
  const int64_t tile = n_tiles > 0 ? std::min(kKeyTile, round_up(ceil_div(end - begin, n_tiles), 4)) : kKeyTile;
  for (int64_t t0 = begin; t0 < end; t0 += tile) {
    const int64_t n_keys = std::min(tile, end - t0);
    const int64_t n_next = std::min(tile, end - t0 - n_keys);
    const T* k_rows = keys.k + t0 * keys.k_key_stride;
    const T* v_rows = keys.v + t0 * keys.v_key_stride;
    const int64_t k_next_bytes = prefetch_k ? n_next * keys.k_key_stride * static_cast<int64_t>(sizeof(T)) : 0;
    const int64_t v_next_bytes = prefetch_v ? n_next * keys.v_key_stride * static_cast<int64_t>(sizeof(T)) : 0;

    if (!k_in_place) stage_tile(k_rows, keys.k_key_stride, keys.k_head_stride, n_keys, d, ws);
    for (int64_t g = 0; g < heads; ++g) {
      if (k_next_bytes > 0) prefetch_part(k_rows + n_keys * keys.k_key_stride, k_next_bytes, g, heads);
      if (k_in_place) {
        ws.scores_and_softmax(g, k_rows + g * keys.k_head_stride, keys.k_key_stride, t0, n_keys, key_end);
      } else {
        ws.scores_and_softmax(g, ws.kv_tile(g), dp, t0, n_keys, key_end);
      }
    }

    if (!v_in_place) stage_tile(v_rows, keys.v_key_stride, keys.v_head_stride, n_keys, d, ws);
    for (int64_t g = 0; g < heads; ++g) {
      if (v_next_bytes > 0) prefetch_part(v_rows + n_keys * keys.v_key_stride, v_next_bytes, g, heads);
      if (v_in_place) {
        ws.accumulate_pv(g, v_rows + g * keys.v_head_stride, keys.v_key_stride, t0, n_keys, key_end);
      } else {
        ws.accumulate_pv(g, ws.kv_tile(g), dp, t0, n_keys, key_end);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Scheduling.

// Runs work(item, workspace) for every item in [0, items) on the intra-op threads. Each
// thread takes the next unclaimed item (callers order items from most to least costly),
// which balances uneven items and keeps going when another process slows one core; each
// task allocates its workspace once.
template <typename MakeWorkspace, typename Work>
void run_items(int64_t items, const MakeWorkspace& make_workspace, const Work& work) {
  if (items <= 0) return;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    auto workspace = make_workspace();
    for (int64_t item = next_item++; item < items; item = next_item++) work(item, workspace);
  });
}

}  // namespace did_engine::cpu_attention
