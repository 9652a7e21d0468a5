// The interface between the CUDA ops (ops_cuda.cu: checks, allocation, registration) and
// the kernel files (<op>.cu: kernels, planning, launch). Plain C++ over raw pointers, no
// ATen, so that the kernel files compile without parsing ATen's headers (see "Build
// layout" in common.cuh).
//
// Strides are in elements unless a comment says bytes; head_dim is always the contiguous
// (unit-stride) dimension. Every launcher enqueues on `stream` and returns the CUDA error
// of the launch (cudaSuccess when fine); none of them synchronises.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace did_engine {
namespace cuda {

// The floating-point dtypes of the attention ops.
enum class FloatKind { kFloat32, kBFloat16, kFloat16 };

// ---------------------------------------------------------------------------------------
// block_decode_attention

struct DecodeAttentionParams {
  // Inputs (strides of batch, seq, head).
  const void* q;        // [B, n, H, D]
  const void* k_cache;  // [B, S_max, H_kv, D]
  const void* v_cache;
  const void* k_block;  // [B, n, H_kv, D]
  const void* v_block;
  const int32_t* cache_lens;  // [B]
  int64_t cache_lens_stride;
  int64_t q_strides[3], k_cache_strides[3], v_cache_strides[3], k_block_strides[3], v_block_strides[3];
  // Outputs.
  void* out;           // [B, n, H, D] contiguous, q's dtype
  float* partial_out;  // [B, n, H, num_splits, D] normalised per split (needed when num_splits > 1)
  float* partial_lse;  // [B, n, H, num_splits] log2-sum-exp per split (needed when num_splits > 1)
  // Shapes.
  int batch, block_len, heads, kv_heads, group, head_dim, cache_capacity;
  float scale_log2;  // scale * log2(e)
  // Plan (filled by plan_decode_attention).
  bool tensor_cores;   // mma path (else FMA)
  bool vector_loads;   // FMA path: 16-byte loads of K/V rows
  int rows_per_warp;   // FMA path: 1..4
  int rows_per_cta;    // 64 (mma) or 4 * rows_per_warp (FMA)
  int row_groups;      // ceil(n * G / rows_per_cta)
  int num_splits;
  int keys_per_split;  // a multiple of 64
};

// Fills the plan fields from shapes and pointer alignment only (never from cache_lens),
// and returns the number of CTAs of the main kernel. Needs the inputs and shapes set.
int64_t plan_decode_attention(DecodeAttentionParams& p, FloatKind kind, int num_sms);
cudaError_t launch_block_decode_attention(const DecodeAttentionParams& p, FloatKind kind, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// block_causal_attention

struct BlockCausalParams {
  const void* q;  // [B, S, H, D]
  const void* k;  // [B, S, H_kv, D]
  const void* v;
  void* out;  // [B, S, H, D] contiguous, q's dtype
  int64_t q_strides[3], k_strides[3], v_strides[3];  // batch, seq, head
  int batch, seq_len, heads, kv_heads, group, head_dim;
  int block_size;  // clamped to [1, seq_len]
  float scale_log2;
  // Plan (filled by plan_block_causal_attention).
  bool tensor_cores, vector_loads;
};

// Fills the plan fields and returns the number of CTAs.
int64_t plan_block_causal_attention(BlockCausalParams& p, FloatKind kind);
cudaError_t launch_block_causal_attention(const BlockCausalParams& p, FloatKind kind, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// kv_commit

struct KvCommitParams {
  char* k_cache;  // [B, S_max, H_kv, D]
  char* v_cache;
  const char* k_block;  // [B, n, H_kv, D]
  const char* v_block;
  int32_t* cache_lens;  // [B], advanced in place
  int64_t cache_lens_stride;
  // Strides of batch, seq, head, in BYTES.
  int64_t k_cache_strides[3], v_cache_strides[3], k_block_strides[3], v_block_strides[3];
  int batch, block_len, kv_heads, cache_capacity;
  int64_t row_bytes;  // head_dim * element size
};

// Copies the block (rows whose length leaves room), then advances those rows' lengths.
cudaError_t launch_kv_commit(const KvCommitParams& p, int num_sms, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// snapshot_remask

struct SnapshotRemaskParams {
  int64_t* tokens;         // [B, S]
  float* confidence;       // [B, S]
  const bool* eligible;    // [B, S]
  const void* num_remask;  // [B], int32 or int64
  int64_t tokens_strides[2], confidence_strides[2], eligible_strides[2];
  int64_t num_remask_stride;
  bool num_remask_is_int64;
  int64_t* out;  // [B, max_k] contiguous
  int batch, seq_len, max_k;
  int64_t mask_id;
  float reset_value;
};

cudaError_t launch_snapshot_remask(const SnapshotRemaskParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Host helpers (plain C++).

inline bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// True when ptr + i * strides[0] + j * strides[1] + ... (strides in elements of
// elem_size bytes) stays aligned to `bytes` whenever ptr is.
inline bool strides_aligned(const int64_t* strides, int count, int64_t elem_size, int64_t bytes) {
  for (int i = 0; i < count; ++i)
    if ((strides[i] * elem_size) % bytes != 0) return false;
  return true;
}

// Number of SMs of the current device, cached per device (no stream work: capture-safe).
inline int current_device_sm_count() {
  static int cached[64] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (device >= 0 && device < 64 && cached[device] > 0) return cached[device];
  int sms = 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1) sms = 1;
  if (device >= 0 && device < 64) cached[device] = sms;
  return sms;
}

}  // namespace cuda
}  // namespace did_engine
