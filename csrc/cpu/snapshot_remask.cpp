// snapshot_remask on CPU: per row, the num_remask eligible positions of lowest confidence
// get mask_id (tokens) and reset_value (confidence), in place; their indices are returned
// ascending, padded with -1 (the refine step of the Diffusion-in-Diffusion sampler).
//
// Per row, one pass over the data and then work on shrinking candidate sets:
//   1. map every position to a 32-bit key whose unsigned order is the op's order on
//      confidences; positions that are not eligible get the largest key of all;
//   2. radix select, most significant byte first: histogram the keys' byte, walk to the
//      bucket holding the k-th smallest key, keep only that bucket's keys, repeat with the
//      next byte (at most four levels, usually two; a bucket of a few dozen keys is
//      finished with std::nth_element instead). This gives a threshold key T, and whether
//      the cut falls inside a run of keys equal to T;
//   3. one scan in position order emits every key < T and the keys equal to T up to the
//      cut. Because the scan is in position order, ties go to the lower index and the
//      output is already ascending: no sort.
// The scans are AVX2 (compare, then pack the selected lanes with a permutation table)
// when compiled with it, with plain branch-free loops otherwise.
//
// Nothing is written to tokens/confidence until every row's count has been validated, so
// a refused call leaves its inputs untouched (and reading everything before writing makes
// the result independent of any overlap between the inputs).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "cpu/ops_cpu.h"

namespace did_engine {
namespace {

constexpr const char* kOp = "snapshot_remask";
// Below this many candidates the radix select finishes with std::nth_element.
constexpr int64_t kFewCandidates = 32;

// +inf maps to 0xFF800000, so the two largest keys are free for NaN and "not eligible".
constexpr uint32_t kNaNKey = 0xFFFFFFFEu;
constexpr uint32_t kIneligibleKey = 0xFFFFFFFFu;

// Unsigned order of the result == the op's order:
//   -inf < ... < -0.0 == +0.0 < ... < +inf < NaN (every NaN equal) < not eligible.
inline uint32_t order_key(float x, bool eligible) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  u = u == 0x80000000u ? 0u : u;  // -0.0 must tie with +0.0 so that the index decides
  // Negatives: flip every bit (a larger magnitude ranks lower). Non-negatives: set the
  // sign bit so they rank above every negative.
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u;
  const uint32_t key = x != x ? kNaNKey : (u ^ flip);
  return eligible ? key : kIneligibleKey;
}

// Per-thread scratch for one row; 8 spare slots because the vector loops store whole
// registers past the last kept element.
struct Scratch {
  explicit Scratch(int64_t S) : key(new uint32_t[S + 8]), aux(new uint32_t[S + 8]) {}
  std::unique_ptr<uint32_t[]> key, aux;
};

#if defined(__AVX2__)
// For each 8-bit lane mask, the indices of the set lanes packed to the front.
struct PackTable {
  uint8_t lanes[256][8];
  constexpr PackTable() : lanes{} {
    for (int mask = 0; mask < 256; ++mask) {
      int w = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (mask >> lane & 1) lanes[mask][w++] = static_cast<uint8_t>(lane);
    }
  }
};
alignas(64) constexpr PackTable kPack{};

// Stores the lanes of v selected by mask contiguously at dst (all 8 lanes are written);
// returns how many were selected.
inline int64_t pack_store(__m256i v, int mask, uint32_t* dst) {
  const __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kPack.lanes[mask])));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permutevar8x32_epi32(v, perm));
  return __builtin_popcount(static_cast<unsigned>(mask));
}

inline int lane_mask(__m256i m) { return _mm256_movemask_ps(_mm256_castsi256_ps(m)); }
#endif

// Step 1: keys of one row; returns its eligible count. The contiguous instance vectorises.
template <bool kContiguous>
int64_t build_keys(const float* conf, int64_t conf_stride, const uint8_t* elig, int64_t elig_stride, int64_t S,
                   uint32_t* key) {
  int64_t n = 0;
  for (int64_t i = 0; i < S; ++i) {
    // bool storage is read as bytes: any nonzero byte counts as eligible.
    const bool e = elig[kContiguous ? i : i * elig_stride] != 0;
    key[i] = order_key(conf[kContiguous ? i : i * conf_stride], e);
    n += e;
  }
  return n;
}

// hist[d] = number of keys whose byte at `shift` is d. Long inputs use four sub-histograms,
// so that runs of equal bytes (ties, or a narrow range of confidences) do not serialise on
// one counter; short ones one, as clearing and summing the four would dominate.
inline void byte_histogram(const uint32_t* key, int64_t m, int shift, int64_t* hist) {
  if (m < 256) {
    std::fill(hist, hist + 256, 0);
    for (int64_t j = 0; j < m; ++j) ++hist[(key[j] >> shift) & 0xFF];
    return;
  }
  uint32_t sub[4][256];
  std::memset(sub, 0, sizeof(sub));
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    ++sub[0][(key[j] >> shift) & 0xFF];
    ++sub[1][(key[j + 1] >> shift) & 0xFF];
    ++sub[2][(key[j + 2] >> shift) & 0xFF];
    ++sub[3][(key[j + 3] >> shift) & 0xFF];
  }
  for (; j < m; ++j) ++sub[0][(key[j] >> shift) & 0xFF];
  for (int d = 0; d < 256; ++d) hist[d] = int64_t{sub[0][d]} + sub[1][d] + sub[2][d] + sub[3][d];
}

// Keeps the keys with (key & high) == want, in order; dst may equal src.
inline int64_t keep_group(const uint32_t* src, int64_t m, uint32_t high, uint32_t want, uint32_t* dst) {
  int64_t j = 0, w = 0;
#if defined(__AVX2__)
  const __m256i hv = _mm256_set1_epi32(static_cast<int>(high)), wv = _mm256_set1_epi32(static_cast<int>(want));
  for (; j + 8 <= m; j += 8) {
    const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j));
    w += pack_store(kv, lane_mask(_mm256_cmpeq_epi32(_mm256_and_si256(kv, hv), wv)), dst + w);
  }
#endif
  for (; j < m; ++j) {
    const uint32_t kv = src[j];
    dst[w] = kv;
    w += (kv & high) == want;
  }
  return w;
}

// Position of the count-th key equal to value (it exists; count >= 1).
inline int64_t nth_equal(const uint32_t* key, int64_t S, uint32_t value, int64_t count) {
  int64_t j = 0;
#if defined(__AVX2__)
  const __m256i vv = _mm256_set1_epi32(static_cast<int>(value));
  for (; j + 8 <= S; j += 8) {
    const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + j));
    const int64_t c = __builtin_popcount(static_cast<unsigned>(lane_mask(_mm256_cmpeq_epi32(kv, vv))));
    if (c >= count) break;
    count -= c;
  }
#endif
  for (;; ++j) {
    count -= key[j] == value;
    if (count == 0) return j;
  }
}

// Step 3: positions j with key < threshold, or key == threshold and j <= last, ascending.
inline int64_t emit(const uint32_t* key, int64_t S, uint32_t threshold, int64_t last, uint32_t* dst) {
  int64_t j = 0, w = 0;
#if defined(__AVX2__)
  // AVX2 compares are signed: flipping the top bit turns them into unsigned compares.
  const __m256i bias = _mm256_set1_epi32(std::numeric_limits<int32_t>::min());
  const __m256i tv = _mm256_set1_epi32(static_cast<int>(threshold ^ 0x80000000u));
  const __m256i lastv = _mm256_set1_epi32(static_cast<int>(std::min<int64_t>(last, INT32_MAX)));
  const __m256i step = _mm256_set1_epi32(8);
  __m256i pos = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; j + 8 <= S; j += 8) {
    const __m256i kv = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + j)), bias);
    const __m256i below = _mm256_cmpgt_epi32(tv, kv);
    const __m256i tie_in = _mm256_andnot_si256(_mm256_cmpgt_epi32(pos, lastv), _mm256_cmpeq_epi32(tv, kv));
    w += pack_store(pos, lane_mask(_mm256_or_si256(below, tie_in)), dst + w);
    pos = _mm256_add_epi32(pos, step);
  }
#endif
  // Branch-free: the cut falls at unpredictable positions.
  for (; j < S; ++j) {
    const uint32_t kv = key[j];
    dst[w] = static_cast<uint32_t>(j);
    w += static_cast<int>(kv < threshold) | (static_cast<int>(kv == threshold) & static_cast<int>(j <= last));
  }
  return w;
}

// Selects one row. Returns its eligible count; when 0 < k <= that count, writes the k
// selected positions ascending into out[0..k).
int64_t select_row(const float* conf, int64_t conf_stride, const uint8_t* elig, int64_t elig_stride, int64_t S,
                   int64_t k, Scratch& scratch, int64_t* out) {
  uint32_t* key = scratch.key.get();
  uint32_t* aux = scratch.aux.get();
  const int64_t n = conf_stride == 1 && elig_stride == 1
                        ? build_keys<true>(conf, 1, elig, 1, S, key)
                        : build_keys<false>(conf, conf_stride, elig, elig_stride, S, key);
  if (k > n || k == 0) return n;

  // Step 2. Invariant: the k-th smallest key has the bits `prefix` above `shift + 8`;
  // cand[0..m) are the keys with that prefix, and `need` of them are still to be taken.
  // Ineligible keys take part but are never reached, since k <= n.
  int64_t hist[256];
  const uint32_t* cand = key;
  int64_t m = S, need = k;
  uint32_t prefix = 0, threshold = 0;
  bool cut_in_tie = false;  // the cut falls inside a run of keys equal to threshold
  for (int shift = 24;; shift -= 8) {
    if (m <= kFewCandidates) {
      // Few left: a histogram would cost more than selecting directly (on a copy, as
      // key[] must keep position order).
      uint32_t* few = aux;
      if (cand != aux) std::copy(cand, cand + m, aux);
      std::nth_element(few, few + need - 1, few + m);
      threshold = few[need - 1];
      int64_t below = 0, equal = 0;
      for (int64_t j = 0; j < m; ++j) {
        below += few[j] < threshold;
        equal += few[j] == threshold;
      }
      need -= below;
      cut_in_tie = need < equal;
      break;
    }
    byte_histogram(cand, m, shift, hist);
    int d = 0;
    while (need > hist[d]) need -= hist[d++];
    prefix |= static_cast<uint32_t>(d) << shift;
    const uint32_t low_bits = shift ? (1u << shift) - 1 : 0u;
    if (need == hist[d]) {
      // The whole bucket is taken: every key up to its top.
      threshold = prefix | low_bits;
      break;
    }
    if (shift == 0) {
      // The bucket is one key value and only `need` of its copies are taken.
      threshold = prefix;
      cut_in_tie = true;
      break;
    }
    m = keep_group(cand, m, ~low_bits, prefix, aux);
    cand = aux;
  }

  const int64_t last = cut_in_tie ? nth_equal(key, S, threshold, need) : S;
  const int64_t w = emit(key, S, threshold, last, aux);
  TORCH_INTERNAL_ASSERT(w == k, "snapshot_remask: selected ", w, " positions instead of ", k);
  for (int64_t j = 0; j < k; ++j) out[j] = aux[j];
  return n;
}

}  // namespace

at::Tensor snapshot_remask_cpu(at::Tensor& tokens, at::Tensor& confidence, const at::Tensor& num_remask,
                               const at::Tensor& eligible, int64_t mask_id, double reset_value, int64_t max_k) {
  check_snapshot_remask(tokens, confidence, num_remask, eligible, mask_id, max_k);
  DID_CHECK(tokens.device().is_cpu(), kOp, "tokens is on ", tokens.device(), ", not on the CPU (the CPU kernel was called)");
  check_no_internal_overlap(tokens, kOp, "tokens");
  check_no_internal_overlap(confidence, kOp, "confidence");
  const int64_t B = tokens.size(0), S = tokens.size(1);
  // Positions travel in 32-bit lanes.
  DID_CHECK(S <= std::numeric_limits<int32_t>::max(), kOp, "tokens rows longer than 2^31 - 1 positions are not supported, got S=", S);

  // Counts: range checks that need no data first, in row order.
  std::vector<int64_t> counts(B);
  if (num_remask.scalar_type() == at::kInt) {
    auto a = num_remask.accessor<int32_t, 1>();
    for (int64_t b = 0; b < B; ++b) counts[b] = a[b];
  } else {
    auto a = num_remask.accessor<int64_t, 1>();
    for (int64_t b = 0; b < B; ++b) counts[b] = a[b];
  }
  for (int64_t b = 0; b < B; ++b) {
    DID_CHECK(counts[b] >= 0, kOp, "num_remask[", b, "] = ", counts[b], " is negative (row ", b, ")");
    DID_CHECK(counts[b] <= max_k, kOp, "num_remask[", b, "] = ", counts[b], " exceeds max_k=", max_k, " (row ", b,
              "); max_k is the output width and must be >= every count");
  }

  at::Tensor out = at::empty({B, max_k}, tokens.options().dtype(at::kLong));
  if (B == 0) return out;
  int64_t* out_data = out.data_ptr<int64_t>();
  const float* conf_data = confidence.data_ptr<float>();
  const uint8_t* elig_data = reinterpret_cast<const uint8_t*>(eligible.data_ptr());
  const int64_t cs0 = confidence.stride(0), cs1 = confidence.stride(1);
  const int64_t es0 = eligible.stride(0), es1 = eligible.stride(1);

  // Select every row (reads only), recording eligible counts for validation.
  std::vector<int64_t> eligible_count(B);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch(S);
    for (int64_t b = begin; b < end; ++b) {
      int64_t* row_out = out_data + b * max_k;
      eligible_count[b] =
          select_row(conf_data + b * cs0, cs1, elig_data + b * es0, es1, S, counts[b], scratch, row_out);
      for (int64_t j = counts[b]; j < max_k; ++j) row_out[j] = -1;
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    DID_CHECK(counts[b] <= eligible_count[b], kOp, "num_remask[", b, "] = ", counts[b], " exceeds the ",
              eligible_count[b], " eligible positions of row ", b);
  }

  // Every row is valid: write.
  int64_t* tok_data = tokens.data_ptr<int64_t>();
  float* conf_write = confidence.data_ptr<float>();
  const int64_t ts0 = tokens.stride(0), ts1 = tokens.stride(1);
  const float reset = static_cast<float>(reset_value);
  at::parallel_for(0, B, std::max<int64_t>(1, grain * 4), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* row_out = out_data + b * max_k;
      int64_t* tok_row = tok_data + b * ts0;
      float* conf_row = conf_write + b * cs0;
      for (int64_t j = 0; j < counts[b]; ++j) {
        tok_row[row_out[j] * ts1] = mask_id;
        conf_row[row_out[j] * cs1] = reset;
      }
    }
  });
  return out;
}

}  // namespace did_engine
