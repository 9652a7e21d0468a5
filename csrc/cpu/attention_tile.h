// Shared pieces of the CPU attention kernels (block_decode_attention,
// block_causal_attention): float32 micro-kernels over a tile of keys, the online-softmax
// state of a set of query rows, and a small work scheduler.
//
// Layout used by the micro-kernels: every query row, accumulator row and key/value row is
// a float32 vector of `dp` values (head_dim rounded up to the SIMD width, zero padded), so
// the inner loops have no tails. Keys stay in their natural [key, head_dim] layout: a
// score is a dot product reduced horizontally once per (row, key) pair. That avoids
// transposing K, reads each key row as one contiguous run, and costs the same few loads
// per FMA as a broadcast kernel. When the inputs are float32 with head_dim a multiple of
// the SIMD width, K and V rows are read straight from the caller's tensors; otherwise a
// tile of rows is converted (bf16/fp16 -> float32) into a small buffer first, once per
// tile, and reused by every query row.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>

namespace did_engine::cpu_attention {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// Keys per online-softmax step: enough to amortise the per-row rescale, few enough that a
// converted K and V tile (2 * 32 * dp floats) stays in L1.
constexpr int64_t kKeyTile = 32;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// The kernels index rows with strides but read each row as a contiguous run.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) == 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// ---------------------------------------------------------------------------------------
// Loads and conversions.

inline Vec load_float(const float* p) { return Vec::loadu(p); }

template <typename T>
inline Vec load_float(const T* p) {
  Vec v;
  at::vec::load_to_float<T>(p, v);
  return v;
}

// dst[0:dp] = float(src[0:d]) * mult, zero padded past d.
template <typename T>
inline void row_to_float(const T* src, int64_t d, int64_t dp, float mult, float* dst) {
  const Vec mult_vec(mult);
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) (load_float(src + c) * mult_vec).store(dst + c);
  for (; c < d; ++c) dst[c] = static_cast<float>(src[c]) * mult;
  for (; c < dp; ++c) dst[c] = 0.f;
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

// ---------------------------------------------------------------------------------------
// Horizontal sums.

inline float hsum(const Vec& a) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m128 halves = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
#else
  float lanes[kLanes];
  a.store(lanes);
  float sum = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) sum += lanes[i];
  return sum;
#endif
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

// Pins a value to a register. Without it GCC re-reads each key vector from memory inside
// every FMA that uses it (memory operands), which makes the score loop load-bound.
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
// Scores: s[r * lds + t] = dot(q_r, k_t) over dp values.

// ROWS query rows x 4 keys: 4 * ROWS accumulators, 4 + 1 loads per 4 * ROWS FMAs.
template <int ROWS>
inline void dot_rows_4keys(const float* q, int64_t ldq, const float* k, int64_t ldk, int64_t dp, float* s,
                           int64_t lds) {
  Vec acc[ROWS][4];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < 4; ++t) acc[r][t] = Vec(0.f);
  for (int64_t c = 0; c < dp; c += kLanes) {
    Vec k0 = Vec::loadu(k + c), k1 = Vec::loadu(k + ldk + c);
    Vec k2 = Vec::loadu(k + 2 * ldk + c), k3 = Vec::loadu(k + 3 * ldk + c);
    keep_in_register(k0), keep_in_register(k1), keep_in_register(k2), keep_in_register(k3);
    for (int r = 0; r < ROWS; ++r) {
      const Vec qr = Vec::loadu(q + r * ldq + c);
      acc[r][0] = at::vec::fmadd(qr, k0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(qr, k1, acc[r][1]);
      acc[r][2] = at::vec::fmadd(qr, k2, acc[r][2]);
      acc[r][3] = at::vec::fmadd(qr, k3, acc[r][3]);
    }
  }
  for (int r = 0; r < ROWS; ++r) hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], s + r * lds);
}

template <int ROWS>
inline void dot_rows_1key(const float* q, int64_t ldq, const float* k, int64_t dp, float* s, int64_t lds) {
  Vec acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = Vec(0.f);
  for (int64_t c = 0; c < dp; c += kLanes) {
    const Vec kc = Vec::loadu(k + c);
    for (int r = 0; r < ROWS; ++r) acc[r] = at::vec::fmadd(Vec::loadu(q + r * ldq + c), kc, acc[r]);
  }
  for (int r = 0; r < ROWS; ++r) s[r * lds] = hsum(acc[r]);
}

template <int ROWS>
inline void dot_rows_keys(const float* q, int64_t ldq, const float* k, int64_t ldk, int64_t keys, int64_t dp,
                          float* s, int64_t lds) {
  int64_t t = 0;
  for (; t + 4 <= keys; t += 4) dot_rows_4keys<ROWS>(q, ldq, k + t * ldk, ldk, dp, s + t, lds);
  for (; t < keys; ++t) dot_rows_1key<ROWS>(q, ldq, k + t * ldk, dp, s + t, lds);
}

// Scores of `rows` query rows [rows, dp] against `keys` key rows [keys, ldk].
inline void tile_scores(const float* q, int64_t ldq, int64_t rows, const float* k, int64_t ldk, int64_t keys,
                        int64_t dp, float* s, int64_t lds) {
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) dot_rows_keys<2>(q + r * ldq, ldq, k, ldk, keys, dp, s + r * lds, lds);
  if (r < rows) dot_rows_keys<1>(q + r * ldq, ldq, k, ldk, keys, dp, s + r * lds, lds);
}

// ---------------------------------------------------------------------------------------
// P.V: acc[r, :] += sum_t p[r, t] * v[t, :], broadcasting p and FMA-ing rows of V.

// ROWS rows x CH vectors of the head dim, starting at column c0.
template <int ROWS, int CH>
inline void pv_block(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t keys, float* acc,
                     int64_t ldacc, int64_t c0) {
  Vec a[ROWS][CH];
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < CH; ++j) a[r][j] = Vec::loadu(acc + r * ldacc + c0 + j * kLanes);
  for (int64_t t = 0; t < keys; ++t) {
    Vec vt[CH];
    for (int j = 0; j < CH; ++j) vt[j] = Vec::loadu(v + t * ldv + c0 + j * kLanes);
    for (int r = 0; r < ROWS; ++r) {
      const Vec pr(p[r * ldp + t]);
      for (int j = 0; j < CH; ++j) a[r][j] = at::vec::fmadd(pr, vt[j], a[r][j]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < CH; ++j) a[r][j].store(acc + r * ldacc + c0 + j * kLanes);
}

template <int ROWS>
inline void pv_rows(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t keys, int64_t dp, float* acc,
                    int64_t ldacc) {
  int64_t c = 0;
  for (; c + 2 * kLanes <= dp; c += 2 * kLanes) pv_block<ROWS, 2>(p, ldp, v, ldv, keys, acc, ldacc, c);
  if (c < dp) pv_block<ROWS, 1>(p, ldp, v, ldv, keys, acc, ldacc, c);
}

inline void tile_pv(const float* p, int64_t ldp, int64_t rows, const float* v, int64_t ldv, int64_t keys,
                    int64_t dp, float* acc, int64_t ldacc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) pv_rows<4>(p + r * ldp, ldp, v, ldv, keys, dp, acc + r * ldacc, ldacc);
  switch (rows - r) {
    case 3: pv_rows<3>(p + r * ldp, ldp, v, ldv, keys, dp, acc + r * ldacc, ldacc); break;
    case 2: pv_rows<2>(p + r * ldp, ldp, v, ldv, keys, dp, acc + r * ldacc, ldacc); break;
    case 1: pv_rows<1>(p + r * ldp, ldp, v, ldv, keys, dp, acc + r * ldacc, ldacc); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------
// Online softmax.

// Folds one tile of raw scores s [rows, lds] (first `keys` columns valid) into each row's
// running max and sum: the scores become probabilities relative to the new max, and the
// row's accumulator is rescaled when its max moved.
inline void online_softmax_tile(float* s, int64_t lds, int64_t rows, int64_t keys, float* row_max, float* row_sum,
                                float* acc, int64_t ldacc, int64_t dp) {
  const int64_t keys_padded = round_up(keys, kLanes);
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = s + r * lds;
    // Padding lanes get -inf so that they vanish from the max and give p = 0.
    for (int64_t t = keys; t < keys_padded; ++t) sr[t] = kNegInf;
    Vec max_vec(kNegInf);
    for (int64_t t = 0; t < keys_padded; t += kLanes) max_vec = at::vec::maximum(max_vec, Vec::loadu(sr + t));
    float tile_max = kNegInf;
    {
      float lanes[kLanes];
      max_vec.store(lanes);
      for (int64_t i = 0; i < kLanes; ++i) tile_max = std::max(tile_max, lanes[i]);
    }
    const float old_max = row_max[r];
    const float new_max = std::max(old_max, tile_max);
    const Vec new_max_vec(new_max);
    Vec sum_vec(0.f);
    for (int64_t t = 0; t < keys_padded; t += kLanes) {
      const Vec p = (Vec::loadu(sr + t) - new_max_vec).exp_u20();
      p.store(sr + t);
      sum_vec = sum_vec + p;
    }
    const float alpha = std::exp(old_max - new_max);  // 0 on the first tile (old = -inf)
    row_sum[r] = row_sum[r] * alpha + hsum(sum_vec);
    row_max[r] = new_max;
    if (alpha != 1.f) {
      float* acc_r = acc + r * ldacc;
      const Vec alpha_vec(alpha);
      for (int64_t c = 0; c < dp; c += kLanes) (Vec::loadu(acc_r + c) * alpha_vec).store(acc_r + c);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Query rows and key ranges.

// The running state of a set of query rows: scaled float queries and the online-softmax
// accumulators, each row dp floats apart.
struct QueryRows {
  const float* q;  // [rows, dp]
  float* acc;      // [rows, dp] unnormalised output
  float* row_max;  // [rows]
  float* row_sum;  // [rows]
  int64_t rows;

  QueryRows slice(int64_t begin, int64_t end, int64_t dp) const {
    return {q + begin * dp, acc + begin * dp, row_max + begin, row_sum + begin, end - begin};
  }
  void reset(int64_t dp) const {
    std::fill(acc, acc + rows * dp, 0.f);
    std::fill(row_max, row_max + rows, kNegInf);
    std::fill(row_sum, row_sum + rows, 0.f);
  }
};

// `count` keys and values of one kv head; consecutive keys are `*_stride` elements apart.
template <typename T>
struct KeyRange {
  const T* k;
  const T* v;
  int64_t k_stride;
  int64_t v_stride;
  int64_t count;

  KeyRange sub(int64_t begin, int64_t end) const {
    return {k + begin * k_stride, v + begin * v_stride, k_stride, v_stride, end - begin};
  }
};

// Per-task scratch: one tile of converted keys and values and the score tile.
struct TileBuffers {
  float* k_tile;  // [kKeyTile, dp]
  float* v_tile;  // [kKeyTile, dp]
  float* scores;  // [max rows, kKeyTile]
};

// Hints the next tile's rows into cache: key rows are strided (other heads sit between
// them), which the hardware prefetchers follow less eagerly than a plain stream.
template <typename T>
inline void prefetch_rows(const T* base, int64_t stride, int64_t count, int64_t d) {
#if defined(__GNUC__)
  const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t t = 0; t < count; ++t) {
    const char* row = reinterpret_cast<const char*>(base + t * stride);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
  }
#else
  (void)base, (void)stride, (void)count, (void)d;
#endif
}

// Streams every key of `keys` once through all of `rows`: per tile of kKeyTile keys,
// scores -> online softmax -> P.V.
template <typename T>
void attend(const QueryRows& rows, const KeyRange<T>& keys, int64_t d, int64_t dp, const TileBuffers& buf) {
  if (rows.rows == 0 || keys.count == 0) return;
  // float32 rows that need no padding are used in place.
  constexpr bool kIsFloat = std::is_same_v<T, float>;
  const bool in_place = kIsFloat && d == dp;
  for (int64_t t0 = 0; t0 < keys.count; t0 += kKeyTile) {
    const int64_t n_keys = std::min(kKeyTile, keys.count - t0);
    const T* k_rows = keys.k + t0 * keys.k_stride;
    const T* v_rows = keys.v + t0 * keys.v_stride;
    const int64_t next = std::min(kKeyTile, keys.count - t0 - n_keys);
    if (next > 0) {
      prefetch_rows(k_rows + n_keys * keys.k_stride, keys.k_stride, next, d);
      prefetch_rows(v_rows + n_keys * keys.v_stride, keys.v_stride, next, d);
    }

    const float* k_f;
    int64_t ldk;
    if (in_place) {
      k_f = reinterpret_cast<const float*>(k_rows);
      ldk = keys.k_stride;
    } else {
      for (int64_t t = 0; t < n_keys; ++t) row_to_float(k_rows + t * keys.k_stride, d, dp, buf.k_tile + t * dp);
      k_f = buf.k_tile;
      ldk = dp;
    }
    tile_scores(rows.q, dp, rows.rows, k_f, ldk, n_keys, dp, buf.scores, kKeyTile);
    online_softmax_tile(buf.scores, kKeyTile, rows.rows, n_keys, rows.row_max, rows.row_sum, rows.acc, dp, dp);

    const float* v_f;
    int64_t ldv;
    if (in_place) {
      v_f = reinterpret_cast<const float*>(v_rows);
      ldv = keys.v_stride;
    } else {
      for (int64_t t = 0; t < n_keys; ++t) row_to_float(v_rows + t * keys.v_stride, d, dp, buf.v_tile + t * dp);
      v_f = buf.v_tile;
      ldv = dp;
    }
    tile_pv(buf.scores, kKeyTile, rows.rows, v_f, ldv, n_keys, dp, rows.acc, dp);
  }
}

// ---------------------------------------------------------------------------------------
// Scratch memory and scheduling.

// One 64-byte aligned float allocation carved into named regions.
class Scratch {
 public:
  explicit Scratch(int64_t floats) : storage_(new float[floats + kAlignFloats]) {
    auto addr = reinterpret_cast<std::uintptr_t>(storage_.get());
    next_ = storage_.get() + (round_up(static_cast<int64_t>(addr), 64) - static_cast<int64_t>(addr)) / 4;
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
  std::unique_ptr<float[]> storage_;
  float* next_;
};

// Workspace of one task: queries, accumulators, softmax state and tiles for up to
// `max_rows` rows.
struct RowWorkspace {
  Scratch scratch;
  QueryRows rows;
  TileBuffers tiles;

  static int64_t floats(int64_t max_rows, int64_t dp) {
    return 2 * Scratch::region(max_rows * dp) + 2 * Scratch::region(max_rows) +
           Scratch::region(max_rows * kKeyTile) + 2 * Scratch::region(kKeyTile * dp);
  }
  RowWorkspace(int64_t max_rows, int64_t dp) : scratch(floats(max_rows, dp)) {
    float* q = scratch.take(max_rows * dp);
    float* acc = scratch.take(max_rows * dp);
    float* row_max = scratch.take(max_rows);
    float* row_sum = scratch.take(max_rows);
    rows = {q, acc, row_max, row_sum, max_rows};
    tiles.scores = scratch.take(max_rows * kKeyTile);
    tiles.k_tile = scratch.take(kKeyTile * dp);
    tiles.v_tile = scratch.take(kKeyTile * dp);
  }
  // The queries of the current item, writable while they are being loaded.
  float* q_rows() { return const_cast<float*>(rows.q); }
};

// Runs work(item, workspace) for item in [0, items) on the intra-op threads. Items are
// dealt round-robin so that neighbouring items (which the callers order to have similar
// cost) spread over all threads; each task allocates its workspace once.
template <typename MakeWorkspace, typename Work>
void run_items(int64_t items, const MakeWorkspace& make_workspace, const Work& work) {
  if (items <= 0) return;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    auto workspace = make_workspace();
    for (int64_t task = task_begin; task < task_end; ++task)
      for (int64_t item = task; item < items; item += tasks) work(item, workspace);
  });
}

}  // namespace did_engine::cpu_attention
