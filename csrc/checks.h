// Argument validation shared by the CPU and CUDA kernels of every op.
//
// These checks look at metadata only (rank, shape, dtype, device, strides), so they cost
// nothing and never synchronise with a device. Checks that need tensor *values* (cache
// lengths in range, remask counts within the eligible count) are done by each kernel where
// it reads the values. Every failure raises a Python ValueError that names the op and the
// argument.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace did_engine {

#define DID_CHECK(cond, op, ...) TORCH_CHECK_VALUE(cond, op, ": ", __VA_ARGS__)

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

inline void check_defined(const at::Tensor& t, const char* op, const char* name) {
  DID_CHECK(t.defined(), op, name, " is undefined (None)");
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* op, const char* name, const char* layout) {
  check_defined(t, op, name);
  DID_CHECK(t.dim() == rank, op, name, " must be a ", rank, "-D tensor ", layout, ", got shape ", shape_str(t));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                              const char* ref_name) {
  DID_CHECK(t.device() == ref.device(), op, name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device(),
            "; all arguments must be on one device");
}

inline void check_attention_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  DID_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op, name,
            " must be float32, bfloat16 or float16, got ", dt);
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  DID_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " has dtype ", t.scalar_type(), " but ", ref_name,
            " has dtype ", ref.scalar_type(), "; they must match");
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* op, const char* name) {
  DID_CHECK(t.numel() == 0 || t.size(-1) == 1 || t.stride(-1) == 1, op, name,
            " must be contiguous in its last dimension (it is written in place, so it cannot be copied)");
}

// The tensor itself when its last dimension has unit stride, else a contiguous copy: the
// attention kernels address rows of head_dim elements with unit stride; other strides are free.
inline at::Tensor with_unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// The kernels compute in float32, so a scale must be finite as a float32 (a double such as
// 1e300 would become inf and turn every score into inf or NaN).
inline double resolve_scale(std::optional<double> scale, int64_t head_dim, const char* op) {
  if (!scale.has_value()) return 1.0 / std::sqrt(static_cast<double>(head_dim));
  DID_CHECK(std::isfinite(*scale), op, "scale must be finite, got ", *scale);
  DID_CHECK(std::abs(*scale) <= FLT_MAX, op, "scale must fit in float32 (|scale| <= ", FLT_MAX, "), got ", *scale);
  return *scale;
}

// ---------------------------------------------------------------------------------------
// Memory overlap of tensors written in place. Proven from sizes, strides and storage
// offsets alone (no data is read); layouts that cannot be proven free of overlap are
// refused, which only excludes exotic views no cache or token buffer has.

// Whether no two elements of a layout share memory: with the dims of size > 1 sorted by
// stride, each stride must exceed the largest offset the smaller dims reach (nested
// layouts: contiguous tensors, slices, permutations, interleaved views). A stride-0 dim
// of size > 1 (an expanded tensor) always fails.
inline bool provably_non_overlapping(const std::vector<std::pair<int64_t, int64_t>>& stride_size) {
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (const auto& [stride, size] : stride_size) {
    if (size == 0) return true;  // no elements at all
    if (size > 1) dims.emplace_back(std::abs(stride), size);
  }
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;  // largest offset of the dims so far
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return false;
    reach += (size - 1) * stride;
  }
  return true;
}

inline std::vector<std::pair<int64_t, int64_t>> stride_size_pairs(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t i = 0; i < t.dim(); ++i) pairs.emplace_back(t.stride(i), t.size(i));
  return pairs;
}

// A tensor written in place must not have two elements at one address.
inline void check_no_internal_overlap(const at::Tensor& t, const char* op, const char* name) {
  DID_CHECK(provably_non_overlapping(stride_size_pairs(t)), op, name,
            " has elements that share memory (an expanded or stride-0 view, or overlapping strides ",
            t.strides(), " for shape ", shape_str(t), "); it is written in place, so it must not");
}

// Bytes [first, last] of the storage that a tensor's elements span (numel > 0).
inline std::pair<int64_t, int64_t> storage_byte_span(const at::Tensor& t) {
  int64_t lo = t.storage_offset(), hi = t.storage_offset();
  for (int64_t i = 0; i < t.dim(); ++i) {
    const int64_t extent = (t.size(i) - 1) * t.stride(i);
    (extent < 0 ? lo : hi) += extent;
  }
  return {lo * t.itemsize(), (hi + 1) * t.itemsize() - 1};
}

// Whether a and b share no element: different storages, disjoint byte ranges, or two
// views with one layout whose elements interleave without meeting (k = kv[:, :, 0] and
// v = kv[:, :, 1] of one buffer): the layout plus a dim of size 2 whose stride is the
// offset between them must be free of overlap.
inline bool provably_disjoint(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return true;
  if (!a.storage().is_alias_of(b.storage())) return true;
  const auto [a_lo, a_hi] = storage_byte_span(a);
  const auto [b_lo, b_hi] = storage_byte_span(b);
  if (a_hi < b_lo || b_hi < a_lo) return true;
  if (a.itemsize() != b.itemsize() || a.sizes() != b.sizes() || a.strides() != b.strides()) return false;
  auto layout = stride_size_pairs(a);
  layout.emplace_back(std::abs(a.storage_offset() - b.storage_offset()), 2);
  return a.storage_offset() != b.storage_offset() && provably_non_overlapping(layout);
}

inline void check_disjoint(const at::Tensor& a, const at::Tensor& b, const char* op, const char* a_name,
                           const char* b_name) {
  DID_CHECK(provably_disjoint(a, b), op, a_name, " and ", b_name, " share memory (views of one buffer that overlap); ",
            a_name, " is written in place, so they must not");
}

// q [B, n, H, D]; k_cache, v_cache [B, S_max, H_kv, D]; k_block, v_block [B, n, H_kv, D];
// cache_lens int32 [B].
inline void check_block_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& k_block, const at::Tensor& v_block,
                                         const at::Tensor& cache_lens) {
  constexpr const char* op = "block_decode_attention";
  check_rank(q, 4, op, "q", "[B, n, H, D]");
  check_rank(k_cache, 4, op, "k_cache", "[B, S_max, H_kv, D]");
  check_rank(v_cache, 4, op, "v_cache", "[B, S_max, H_kv, D]");
  check_rank(k_block, 4, op, "k_block", "[B, n, H_kv, D]");
  check_rank(v_block, 4, op, "v_block", "[B, n, H_kv, D]");
  check_rank(cache_lens, 1, op, "cache_lens", "[B]");
  check_attention_dtype(q, op, "q");
  check_same_dtype(k_cache, q, op, "k_cache", "q");
  check_same_dtype(v_cache, q, op, "v_cache", "q");
  check_same_dtype(k_block, q, op, "k_block", "q");
  check_same_dtype(v_block, q, op, "v_block", "q");
  DID_CHECK(cache_lens.scalar_type() == at::kInt, op, "cache_lens must be int32, got ", cache_lens.scalar_type());
  check_same_device(k_cache, q, op, "k_cache", "q");
  check_same_device(v_cache, q, op, "v_cache", "q");
  check_same_device(k_block, q, op, "k_block", "q");
  check_same_device(v_block, q, op, "v_block", "q");
  check_same_device(cache_lens, q, op, "cache_lens", "q");

  const int64_t B = q.size(0), n = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t S_max = k_cache.size(1), H_kv = k_cache.size(2);
  DID_CHECK(n >= 1, op, "q must hold at least one query (n >= 1), got shape ", shape_str(q));
  DID_CHECK(D >= 1, op, "q must have a head_dim (last dim) >= 1, got shape ", shape_str(q));
  DID_CHECK(H_kv >= 1 && H % H_kv == 0, op, "q has ", H, " heads, which is not a multiple of the ", H_kv,
            " key/value heads of k_cache");
  DID_CHECK(k_cache.size(0) == B && k_cache.size(3) == D, op, "k_cache must be [B=", B, ", S_max, H_kv, D=", D,
            "], got ", shape_str(k_cache));
  DID_CHECK(v_cache.sizes() == k_cache.sizes(), op, "v_cache must have k_cache's shape ", shape_str(k_cache),
            ", got ", shape_str(v_cache));
  DID_CHECK(k_block.size(0) == B && k_block.size(1) == n && k_block.size(2) == H_kv && k_block.size(3) == D, op,
            "k_block must be [B=", B, ", n=", n, ", H_kv=", H_kv, ", D=", D, "], got ", shape_str(k_block));
  DID_CHECK(v_block.sizes() == k_block.sizes(), op, "v_block must have k_block's shape ", shape_str(k_block),
            ", got ", shape_str(v_block));
  DID_CHECK(cache_lens.size(0) == B, op, "cache_lens must have B=", B, " entries, got ", cache_lens.size(0));
  (void)S_max;
}

inline void check_kv_commit(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_block,
                            const at::Tensor& v_block, const at::Tensor& cache_lens) {
  constexpr const char* op = "kv_commit";
  check_rank(k_cache, 4, op, "k_cache", "[B, S_max, H_kv, D]");
  check_rank(v_cache, 4, op, "v_cache", "[B, S_max, H_kv, D]");
  check_rank(k_block, 4, op, "k_block", "[B, n, H_kv, D]");
  check_rank(v_block, 4, op, "v_block", "[B, n, H_kv, D]");
  check_rank(cache_lens, 1, op, "cache_lens", "[B]");
  check_attention_dtype(k_cache, op, "k_cache");
  check_same_dtype(v_cache, k_cache, op, "v_cache", "k_cache");
  check_same_dtype(k_block, k_cache, op, "k_block", "k_cache");
  check_same_dtype(v_block, k_cache, op, "v_block", "k_cache");
  DID_CHECK(cache_lens.scalar_type() == at::kInt, op, "cache_lens must be int32, got ", cache_lens.scalar_type());
  check_same_device(v_cache, k_cache, op, "v_cache", "k_cache");
  check_same_device(k_block, k_cache, op, "k_block", "k_cache");
  check_same_device(v_block, k_cache, op, "v_block", "k_cache");
  check_same_device(cache_lens, k_cache, op, "cache_lens", "k_cache");
  const int64_t B = k_cache.size(0), H_kv = k_cache.size(2), D = k_cache.size(3);
  DID_CHECK(v_cache.sizes() == k_cache.sizes(), op, "v_cache must have k_cache's shape ", shape_str(k_cache),
            ", got ", shape_str(v_cache));
  DID_CHECK(k_block.size(0) == B && k_block.size(2) == H_kv && k_block.size(3) == D, op, "k_block must be [B=", B,
            ", n, H_kv=", H_kv, ", D=", D, "], got ", shape_str(k_block));
  DID_CHECK(v_block.sizes() == k_block.sizes(), op, "v_block must have k_block's shape ", shape_str(k_block),
            ", got ", shape_str(v_block));
  DID_CHECK(k_block.size(1) <= k_cache.size(1), op, "k_block holds ", k_block.size(1),
            " tokens, which cannot fit in a cache of S_max=", k_cache.size(1));
  DID_CHECK(cache_lens.size(0) == B, op, "cache_lens must have B=", B, " entries, got ", cache_lens.size(0));
  check_last_dim_contiguous(k_cache, op, "k_cache");
  check_last_dim_contiguous(v_cache, op, "v_cache");
  // Outputs: each free of internal overlap (an expanded cache_lens [6, 6, 6] would advance
  // one counter three times), and no output sharing memory with another argument.
  check_no_internal_overlap(k_cache, op, "k_cache");
  check_no_internal_overlap(v_cache, op, "v_cache");
  check_no_internal_overlap(cache_lens, op, "cache_lens");
  check_disjoint(k_cache, v_cache, op, "k_cache", "v_cache");
  check_disjoint(cache_lens, k_cache, op, "cache_lens", "k_cache");
  check_disjoint(cache_lens, v_cache, op, "cache_lens", "v_cache");
  const std::pair<const at::Tensor*, const char*> outputs[] = {
      {&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&cache_lens, "cache_lens"}};
  for (const auto& [out, out_name] : outputs) {
    check_disjoint(*out, k_block, op, out_name, "k_block");
    check_disjoint(*out, v_block, op, out_name, "v_block");
  }
}

// q, k, v [B, S, H(_kv), D]; block_size >= 1.
inline void check_block_causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         int64_t block_size) {
  constexpr const char* op = "block_causal_attention";
  check_rank(q, 4, op, "q", "[B, S, H, D]");
  check_rank(k, 4, op, "k", "[B, S, H_kv, D]");
  check_rank(v, 4, op, "v", "[B, S, H_kv, D]");
  check_attention_dtype(q, op, "q");
  check_same_dtype(k, q, op, "k", "q");
  check_same_dtype(v, q, op, "v", "q");
  check_same_device(k, q, op, "k", "q");
  check_same_device(v, q, op, "v", "q");
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t H_kv = k.size(2);
  DID_CHECK(D >= 1, op, "q must have a head_dim (last dim) >= 1, got shape ", shape_str(q));
  DID_CHECK(k.size(0) == B && k.size(1) == S && k.size(3) == D, op, "k must be [B=", B, ", S=", S, ", H_kv, D=", D,
            "], got ", shape_str(k));
  DID_CHECK(H_kv >= 1 && H % H_kv == 0, op, "q has ", H, " heads, which is not a multiple of the ", H_kv,
            " key/value heads of k");
  DID_CHECK(v.sizes() == k.sizes(), op, "v must have k's shape ", shape_str(k), ", got ", shape_str(v));
  DID_CHECK(block_size >= 1, op, "block_size must be >= 1, got ", block_size);
}

// tokens int64 [B, S]; confidence float32 [B, S]; num_remask int32/int64 [B]; eligible bool [B, S].
inline void check_snapshot_remask(const at::Tensor& tokens, const at::Tensor& confidence,
                                  const at::Tensor& num_remask, const at::Tensor& eligible, int64_t mask_id,
                                  int64_t max_k) {
  constexpr const char* op = "snapshot_remask";
  check_rank(tokens, 2, op, "tokens", "[B, S]");
  check_rank(confidence, 2, op, "confidence", "[B, S]");
  check_rank(num_remask, 1, op, "num_remask", "[B]");
  check_rank(eligible, 2, op, "eligible", "[B, S]");
  DID_CHECK(tokens.scalar_type() == at::kLong, op, "tokens must be int64, got ", tokens.scalar_type());
  DID_CHECK(confidence.scalar_type() == at::kFloat, op, "confidence must be float32, got ",
            confidence.scalar_type());
  DID_CHECK(num_remask.scalar_type() == at::kLong || num_remask.scalar_type() == at::kInt, op,
            "num_remask must be int64 or int32, got ", num_remask.scalar_type());
  DID_CHECK(eligible.scalar_type() == at::kBool, op, "eligible must be bool, got ", eligible.scalar_type());
  check_same_device(confidence, tokens, op, "confidence", "tokens");
  check_same_device(num_remask, tokens, op, "num_remask", "tokens");
  check_same_device(eligible, tokens, op, "eligible", "tokens");
  DID_CHECK(confidence.sizes() == tokens.sizes(), op, "confidence must have tokens' shape ", shape_str(tokens),
            ", got ", shape_str(confidence));
  DID_CHECK(eligible.sizes() == tokens.sizes(), op, "eligible must have tokens' shape ", shape_str(tokens),
            ", got ", shape_str(eligible));
  DID_CHECK(num_remask.size(0) == tokens.size(0), op, "num_remask must have B=", tokens.size(0), " entries, got ",
            num_remask.size(0));
  DID_CHECK(mask_id >= 0, op, "mask_id must be >= 0, got ", mask_id);
  DID_CHECK(max_k >= 0 && max_k <= tokens.size(1), op, "max_k must be in [0, S=", tokens.size(1), "], got ", max_k);
  DID_CHECK(!tokens.is_alias_of(confidence), op, "tokens and confidence must not share memory");
}

}  // namespace did_engine
