// The CUDA implementations of the did_engine ops, registered for the CUDA dispatch key
// under the schemas of csrc/ops.cpp. Each op: metadata checks (csrc/checks.h, no sync),
// optional value checks (DID_ENGINE_CHECK_VALUES=1, see common.cuh), output allocation,
// then the kernels of csrc/cuda/<op>.cu on the current stream through launch.h.
//
// Host code only, and the only CUDA source that includes ATen: the whole file is inside
// `#ifndef __CUDA_ARCH__`, so nvcc's device passes see an empty file and never parse ATen
// (see "Build layout" in common.cuh). No kernel or __device__ code may be added here.

#ifndef __CUDA_ARCH__

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

#include "checks.h"
#include "launch.h"

namespace did_engine {
namespace cuda {
namespace {

constexpr double kLog2e = 1.4426950408889634;

// DID_ENGINE_CHECK_VALUES=1 turns on the synchronising value checks; read once.
bool value_checks_requested() {
  static const bool requested = [] {
    const char* env = std::getenv("DID_ENGINE_CHECK_VALUES");
    return env != nullptr && std::strcmp(env, "1") == 0;
  }();
  return requested;
}

// Value checks run only when requested and the stream is not being captured.
bool run_value_checks(cudaStream_t stream) {
  if (!value_checks_requested()) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status == cudaStreamCaptureStatusNone;
}

FloatKind float_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return FloatKind::kFloat32;
    case at::kBFloat16:
      return FloatKind::kBFloat16;
    case at::kHalf:
      return FloatKind::kFloat16;
    default:
      break;
  }
  TORCH_CHECK_VALUE(false, "did_engine CUDA: unsupported dtype ", t.scalar_type());  // rejected by the checks
  return FloatKind::kFloat32;
}

void check_on_cuda(const at::Tensor& t, const char* op, const char* name) {
  DID_CHECK(t.is_cuda(), op, name, " must be a CUDA tensor for the CUDA kernel, got ", t.device());
}

// Strides of dims 0..2 of a 4-D tensor, times `scale` (1: elements, element size: bytes).
// A dimension of size 1 is only ever indexed at 0, so its stride is passed as 0: whatever
// torch reports for it (any value is legal) then never makes the kernels' alignment
// checks refuse a fast path or their 32-bit offset checks refuse 32-bit math.
void outer_strides(const at::Tensor& t, int64_t (&strides)[3], int64_t scale = 1) {
  for (int i = 0; i < 3; ++i) strides[i] = t.size(i) == 1 ? 0 : t.stride(i) * scale;
}

cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

// ---------------------------------------------------------------------------------------

at::Tensor block_decode_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_cache_in,
                                       const at::Tensor& v_cache_in, const at::Tensor& k_block_in,
                                       const at::Tensor& v_block_in, const at::Tensor& cache_lens,
                                       std::optional<double> scale) {
  constexpr const char* op = "block_decode_attention";
  check_block_decode_attention(q_in, k_cache_in, v_cache_in, k_block_in, v_block_in, cache_lens);
  check_on_cuda(q_in, op, "q");
  const int64_t B = q_in.size(0), n = q_in.size(1), H = q_in.size(2), D = q_in.size(3);
  const int64_t S_max = k_cache_in.size(1), H_kv = k_cache_in.size(2);
  DID_CHECK(D <= 256, op, "the CUDA kernel supports head_dim up to 256, got ", D);
  DID_CHECK(S_max + n <= (int64_t{1} << 30) && B * n * H <= (int64_t{1} << 30), op,
            "shapes too large for the CUDA kernel: q ", shape_str(q_in), ", k_cache ", shape_str(k_cache_in));
  const double resolved_scale = resolve_scale(scale, D, op);

  c10::cuda::CUDAGuard device_guard(q_in.device());
  const cudaStream_t stream = current_stream(q_in);
  if (run_value_checks(stream)) {
    const at::Tensor lens = cache_lens.to(at::kCPU);
    const auto lens_a = lens.accessor<int32_t, 1>();
    for (int64_t b = 0; b < B; ++b) {
      DID_CHECK(lens_a[b] >= 0 && lens_a[b] <= S_max, op, "cache_lens[", b, "] = ", lens_a[b],
                " is outside the cache (valid lengths: 0..S_max=", S_max, ")");
    }
  }

  at::Tensor out = at::empty({B, n, H, D}, q_in.options());
  if (out.numel() == 0) return out;

  const at::Tensor q = with_unit_last_stride(q_in);
  const at::Tensor k_cache = with_unit_last_stride(k_cache_in);
  const at::Tensor v_cache = with_unit_last_stride(v_cache_in);
  const at::Tensor k_block = with_unit_last_stride(k_block_in);
  const at::Tensor v_block = with_unit_last_stride(v_block_in);

  DecodeAttentionParams p{};
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_block = k_block.data_ptr();
  p.v_block = v_block.data_ptr();
  p.cache_lens = cache_lens.data_ptr<int32_t>();
  p.cache_lens_stride = cache_lens.stride(0);
  outer_strides(q, p.q_strides);
  outer_strides(k_cache, p.k_cache_strides);
  outer_strides(v_cache, p.v_cache_strides);
  outer_strides(k_block, p.k_block_strides);
  outer_strides(v_block, p.v_block_strides);
  p.out = out.data_ptr();
  p.batch = static_cast<int>(B);
  p.block_len = static_cast<int>(n);
  p.heads = static_cast<int>(H);
  p.kv_heads = static_cast<int>(H_kv);
  p.group = static_cast<int>(H / H_kv);
  p.head_dim = static_cast<int>(D);
  p.cache_capacity = static_cast<int>(S_max);
  p.scale_log2 = static_cast<float>(resolved_scale * kLog2e);

  const FloatKind kind = float_kind(q);
  const int64_t ctas = plan_decode_attention(p, kind, current_device_sm_count());
  DID_CHECK(ctas <= std::numeric_limits<int32_t>::max(), op, "too many CTAs (", ctas, ") for one launch");

  at::Tensor partial_out, partial_lse;  // split-KV workspace (same stream, freed after enqueue: safe)
  if (p.num_splits > 1) {
    const auto float_options = q.options().dtype(at::kFloat);
    partial_out = at::empty({B, n, H, p.num_splits, D}, float_options);
    partial_lse = at::empty({B, n, H, p.num_splits}, float_options);
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
  }
  C10_CUDA_CHECK(launch_block_decode_attention(p, kind, stream));
  return out;
}

// ---------------------------------------------------------------------------------------

void kv_commit_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_block_in,
                    const at::Tensor& v_block_in, at::Tensor& cache_lens) {
  constexpr const char* op = "kv_commit";
  check_kv_commit(k_cache, v_cache, k_block_in, v_block_in, cache_lens);
  check_on_cuda(k_cache, op, "k_cache");
  const int64_t B = k_cache.size(0), S_max = k_cache.size(1), H_kv = k_cache.size(2), D = k_cache.size(3);
  const int64_t n = k_block_in.size(1);
  DID_CHECK(S_max <= (int64_t{1} << 30) && B <= (int64_t{1} << 30), op, "shapes too large for the CUDA kernel: k_cache ",
            shape_str(k_cache));

  c10::cuda::CUDAGuard device_guard(k_cache.device());
  const cudaStream_t stream = current_stream(k_cache);
  if (run_value_checks(stream)) {
    const at::Tensor lens = cache_lens.to(at::kCPU);
    const auto lens_a = lens.accessor<int32_t, 1>();
    for (int64_t b = 0; b < B; ++b) {
      DID_CHECK(lens_a[b] >= 0 && lens_a[b] + n <= S_max, op, "cache_lens[", b, "] = ", lens_a[b],
                " leaves no room for a block of ", n, " in a cache of S_max=", S_max, " (valid lengths: 0..",
                S_max - n, ")");
    }
  }
  if (B == 0 || n == 0) return;

  const at::Tensor k_block = with_unit_last_stride(k_block_in);
  const at::Tensor v_block = with_unit_last_stride(v_block_in);
  const int64_t elem = k_cache.element_size();
  KvCommitParams p{};
  p.k_cache = static_cast<char*>(k_cache.data_ptr());
  p.v_cache = static_cast<char*>(v_cache.data_ptr());
  p.k_block = static_cast<const char*>(k_block.data_ptr());
  p.v_block = static_cast<const char*>(v_block.data_ptr());
  p.cache_lens = cache_lens.data_ptr<int32_t>();
  p.cache_lens_stride = cache_lens.stride(0);
  outer_strides(k_cache, p.k_cache_strides, elem);
  outer_strides(v_cache, p.v_cache_strides, elem);
  outer_strides(k_block, p.k_block_strides, elem);
  outer_strides(v_block, p.v_block_strides, elem);
  p.batch = static_cast<int>(B);
  p.block_len = static_cast<int>(n);
  p.kv_heads = static_cast<int>(H_kv);
  p.cache_capacity = static_cast<int>(S_max);
  p.row_bytes = D * elem;
  // With H_kv or head_dim 0 nothing is copied, but the lengths still advance (as on CPU).
  C10_CUDA_CHECK(launch_kv_commit(p, current_device_sm_count(), stream));
}

// ---------------------------------------------------------------------------------------

at::Tensor block_causal_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                       int64_t block_size, std::optional<double> scale) {
  constexpr const char* op = "block_causal_attention";
  check_block_causal_attention(q_in, k_in, v_in, block_size);
  check_on_cuda(q_in, op, "q");
  const int64_t B = q_in.size(0), S = q_in.size(1), H = q_in.size(2), D = q_in.size(3);
  const int64_t H_kv = k_in.size(2);
  DID_CHECK(D <= 256, op, "the CUDA kernel supports head_dim up to 256, got ", D);
  DID_CHECK(S <= (int64_t{1} << 30) && B * H <= (int64_t{1} << 30), op, "shapes too large for the CUDA kernel: q ",
            shape_str(q_in));
  const double resolved_scale = resolve_scale(scale, D, op);

  c10::cuda::CUDAGuard device_guard(q_in.device());
  const cudaStream_t stream = current_stream(q_in);
  at::Tensor out = at::empty({B, S, H, D}, q_in.options());
  if (out.numel() == 0) return out;

  const at::Tensor q = with_unit_last_stride(q_in);
  const at::Tensor k = with_unit_last_stride(k_in);
  const at::Tensor v = with_unit_last_stride(v_in);
  BlockCausalParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  outer_strides(q, p.q_strides);
  outer_strides(k, p.k_strides);
  outer_strides(v, p.v_strides);
  p.batch = static_cast<int>(B);
  p.seq_len = static_cast<int>(S);
  p.heads = static_cast<int>(H);
  p.kv_heads = static_cast<int>(H_kv);
  p.group = static_cast<int>(H / H_kv);
  p.head_dim = static_cast<int>(D);
  p.block_size = static_cast<int>(std::min(block_size, S));  // block_size >= S: full attention
  p.scale_log2 = static_cast<float>(resolved_scale * kLog2e);

  const FloatKind kind = float_kind(q);
  const int64_t ctas = plan_block_causal_attention(p, kind);
  DID_CHECK(ctas <= std::numeric_limits<int32_t>::max(), op, "too many CTAs (", ctas, ") for one launch");
  C10_CUDA_CHECK(launch_block_causal_attention(p, kind, stream));
  return out;
}

// ---------------------------------------------------------------------------------------

at::Tensor snapshot_remask_cuda(at::Tensor& tokens, at::Tensor& confidence, const at::Tensor& num_remask,
                                const at::Tensor& eligible, int64_t mask_id, double reset_value, int64_t max_k) {
  constexpr const char* op = "snapshot_remask";
  check_snapshot_remask(tokens, confidence, num_remask, eligible, mask_id, max_k);
  check_on_cuda(tokens, op, "tokens");
  // Written in place: no two elements may share memory (metadata only, as on CPU).
  check_no_internal_overlap(tokens, op, "tokens");
  check_no_internal_overlap(confidence, op, "confidence");
  const int64_t B = tokens.size(0), S = tokens.size(1);
  DID_CHECK(S <= std::numeric_limits<int32_t>::max() && B <= std::numeric_limits<int32_t>::max(), op,
            "shapes too large for the CUDA kernel: tokens ", shape_str(tokens));

  c10::cuda::CUDAGuard device_guard(tokens.device());
  const cudaStream_t stream = current_stream(tokens);
  if (run_value_checks(stream)) {
    const at::Tensor counts = num_remask.to(at::kCPU, at::kLong);
    const at::Tensor eligible_counts = eligible.sum(1).to(at::kCPU, at::kLong);
    const auto counts_a = counts.accessor<int64_t, 1>();
    const auto eligible_a = eligible_counts.accessor<int64_t, 1>();
    for (int64_t b = 0; b < B; ++b) {
      DID_CHECK(counts_a[b] >= 0, op, "num_remask[", b, "] = ", counts_a[b], " is negative (row ", b, ")");
      DID_CHECK(counts_a[b] <= max_k, op, "num_remask[", b, "] = ", counts_a[b], " exceeds max_k=", max_k, " (row ", b,
                "); max_k is the output width and must be >= every count");
    }
    for (int64_t b = 0; b < B; ++b) {
      DID_CHECK(counts_a[b] <= eligible_a[b], op, "num_remask[", b, "] = ", counts_a[b], " exceeds the ",
                eligible_a[b], " eligible positions of row ", b);
    }
  }

  at::Tensor out = at::empty({B, max_k}, tokens.options().dtype(at::kLong));
  if (B == 0 || max_k == 0) return out;  // nothing can be selected

  SnapshotRemaskParams p{};
  p.tokens = tokens.data_ptr<int64_t>();
  p.confidence = confidence.data_ptr<float>();
  p.eligible = eligible.data_ptr<bool>();
  p.num_remask = num_remask.data_ptr();
  for (int i = 0; i < 2; ++i) {
    p.tokens_strides[i] = tokens.stride(i);
    p.confidence_strides[i] = confidence.stride(i);
    p.eligible_strides[i] = eligible.stride(i);
  }
  p.num_remask_stride = num_remask.stride(0);
  p.num_remask_is_int64 = num_remask.scalar_type() == at::kLong;
  p.out = out.data_ptr<int64_t>();
  p.batch = static_cast<int>(B);
  p.seq_len = static_cast<int>(S);
  p.max_k = static_cast<int>(max_k);
  p.mask_id = mask_id;
  p.reset_value = static_cast<float>(reset_value);
  C10_CUDA_CHECK(launch_snapshot_remask(p, stream));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(did_engine, CUDA, m) {
  m.impl("block_decode_attention", &block_decode_attention_cuda);
  m.impl("kv_commit", &kv_commit_cuda);
  m.impl("block_causal_attention", &block_causal_attention_cuda);
  m.impl("snapshot_remask", &snapshot_remask_cuda);
}

}  // namespace cuda
}  // namespace did_engine

#endif  // __CUDA_ARCH__
