// Shared device helpers of did_engine's CUDA kernels, and the rules all of them follow.
//
// Value checks without host synchronisation
// -----------------------------------------
// Every CUDA op first runs the metadata checks of csrc/checks.h (shapes, dtypes, devices,
// strides), exactly as the CPU kernels do; they cost nothing and never synchronise.
// Checks on tensor *values* cannot be done on the host without copying those values back,
// which would synchronise the stream and forbid CUDA-graph capture. So by default:
//
//   * every kernel is memory-safe for ANY value of its inputs: it clamps and never reads or
//     writes out of bounds. What an out-of-range value does:
//       block_decode_attention  cache_lens[b] is clamped to [0, S_max].
//       kv_commit               a row whose cache_lens[b] is outside [0, S_max - n] is left
//                               untouched (nothing written, its length not advanced).
//       snapshot_remask         num_remask[b] is clamped to [0, min(eligible count, max_k)].
//   * with the environment variable DID_ENGINE_CHECK_VALUES=1 (read once, at the first
//     CUDA op call), the host code of each op also copies the values it needs to the CPU
//     (a synchronisation) and raises the same ValueError as the CPU kernel, naming the
//     argument, before launching anything. Use it while debugging. These synchronising
//     checks are skipped while the current stream is being captured into a CUDA graph
//     (a synchronisation is illegal there); the kernels stay memory-safe regardless.
//
// Launch rules: every op launches on the current stream of the inputs' device
// (c10::cuda::getCurrentCUDAStream(), the same stream at::cuda::getCurrentCUDAStream()
// returns), allocates its outputs and workspaces through the caching allocator, and has
// output shapes that depend only on input shapes, so a whole draft step can be captured.
//
// Build layout
// ------------
//   launch.h       the interface: one parameter struct (raw pointers, strides, shapes) and
//                  the plan/launch functions of each op. Plain C++, no ATen.
//   <op>.cu        the kernels of one op and its plan/launch functions. CUDA headers and
//                  these headers only: no ATen, so the per-architecture device passes
//                  of nvcc stay fast.
//   ops_cuda.cu    the four ops: csrc/checks.h, value checks, allocation, launch on the
//                  current stream, and TORCH_LIBRARY_IMPL(did_engine, CUDA, m). It is the
//                  only file that includes ATen, and its whole body sits inside
//                  `#ifndef __CUDA_ARCH__`: nvcc compiles a .cu once for the host and once
//                  per GPU architecture, and this file has no device code, so the device
//                  passes skip ATen's headers entirely (they cost ~3x the host pass).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "launch.h"

namespace did_engine {
namespace cuda {

constexpr float kNegInf = -INFINITY;
constexpr float kLog2e = 1.4426950408889634f;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Where one key's head_dim elements and its value's are (attention tile loaders).
template <typename T>
struct KeyValueRows {
  const T* key;
  const T* value;
};

// ---------------------------------------------------------------------------------------
// Conversions. The build defines __CUDA_NO_{HALF,BFLOAT16}_CONVERSIONS__ (as torch does),
// so every conversion is spelled out.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Two floats as one 32-bit register of two 16-bit values; `lo` goes to the low half, which
// is the element with the lower index in tensor-core fragments and in memory.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return bits;
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return bits;
}

// Loads 16 bytes (16 / sizeof(T) elements) from a 16-byte aligned address as floats.
template <typename T>
__device__ __forceinline__ void load16_as_float(const T* src, float* dst) {
  constexpr int kCount = 16 / sizeof(T);
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  T elems[kCount];
  memcpy(elems, &raw, sizeof(raw));
#pragma unroll
  for (int i = 0; i < kCount; ++i) dst[i] = to_float(elems[i]);
}

// ---------------------------------------------------------------------------------------
// Warp and block reductions (blockDim.x a multiple of 32, at most 1024).

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ int warp_inclusive_scan(int v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, v, offset);
    if (lane >= offset) v += other;
  }
  return v;
}

// Exclusive prefix sum of one int per thread over the whole block, in thread order.
// `scratch` is __shared__ int[32]; `total` receives the block's sum. Every thread must call
// it (it synchronises the block three times; `scratch` is free again when it returns).
__device__ __forceinline__ int block_exclusive_scan(int value, int* scratch, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  const int inclusive = warp_inclusive_scan(value);
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int warp_total = lane < num_warps ? scratch[lane] : 0;
    scratch[lane] = warp_inclusive_scan(warp_total);  // inclusive over warps
  }
  __syncthreads();
  const int warps_before = warp > 0 ? scratch[warp - 1] : 0;
  total = scratch[num_warps - 1];
  __syncthreads();
  return warps_before + inclusive - value;
}

// ---------------------------------------------------------------------------------------
// Ampere+ asynchronous global -> shared copies (cp.async, sm_80 and later).

// Copies 16 bytes, or writes 16 zero bytes when !valid (nothing is read then; `src` must
// still be a valid global address, callers pass an in-bounds one).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// ---------------------------------------------------------------------------------------
// Tensor cores: D[16x8] += A[16x16] * B[16x8], 16-bit inputs, float32 accumulation.
//
// Fragment layouts (PTX ISA, mma.m16n8k16), with g = lane / 4 and c = lane % 4:
//   a[0] = A[g    ][2c, 2c+1]    a[1] = A[g + 8][2c, 2c+1]
//   a[2] = A[g    ][2c+8, 2c+9]  a[3] = A[g + 8][2c+8, 2c+9]
//   b[0] = B[2c, 2c+1][g]        b[1] = B[2c+8, 2c+9][g]
//   d[0], d[1] = D[g][2c, 2c+1]  d[2], d[3] = D[g + 8][2c, 2c+1]
// (two 16-bit values per register, the lower index in the low half).

template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                           const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16x8x16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ldmatrix (sm_75 and later): each of the 32 lanes gives the shared address of one 16-byte
// row of 8 16-bit values; lanes 8i .. 8i + 7 address rows 0..7 of matrix i (i = 0..3).
// Register r[i / 2][i % 2] of lane (g = lane / 4, c = lane % 4) then holds, of matrix i,
//   plain (kTrans false):  M_i[g][2c], M_i[g][2c + 1]   (row g, two adjacent columns)
//   .trans (kTrans true):  M_i[2c][g], M_i[2c + 1][g]   (column g, two adjacent rows)
// with the first element in the low half. Row addresses must be 16-byte aligned.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[2][2], const void* smem_row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0][0]), "=r"(r[0][1]), "=r"(r[1][0]), "=r"(r[1][1])
                 : "r"(addr)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0][0]), "=r"(r[0][1]), "=r"(r[1][0]), "=r"(r[1][1])
                 : "r"(addr)
                 : "memory");
  }
}

// How the tensor-core kernels read K and V fragments from shared memory: ldmatrix (the
// default), or one 32-bit / two 16-bit shared loads per register (the first
// implementation, kept to check ldmatrix against: both build the same fragments, so the
// outputs are bit-identical).
enum class FragmentLoads { kLdmatrix, kScalar };

#ifndef DID_ENGINE_MMA_SCALAR_FRAGMENTS
#define DID_ENGINE_MMA_SCALAR_FRAGMENTS 0  // build with -DDID_ENGINE_MMA_SCALAR_FRAGMENTS=1 for scalar loads
#endif

// The fragment loads of the next launch: the build's default (the macro above), unless the
// environment variable DID_ENGINE_MMA_FRAGMENTS is "scalar" or "ldmatrix". Read at every
// launch (a getenv, far below a launch's cost) so that one process, e.g. a test, can run
// both and compare them.
inline FragmentLoads requested_fragment_loads() {
  const char* env = std::getenv("DID_ENGINE_MMA_FRAGMENTS");
  if (env != nullptr && std::strcmp(env, "scalar") == 0) return FragmentLoads::kScalar;
  if (env != nullptr && std::strcmp(env, "ldmatrix") == 0) return FragmentLoads::kLdmatrix;
  return DID_ENGINE_MMA_SCALAR_FRAGMENTS ? FragmentLoads::kScalar : FragmentLoads::kLdmatrix;
}

// ---------------------------------------------------------------------------------------
// Host-side launch helper.

// Allows kKernel `bytes` of dynamic shared memory when that is more than the default 48 KB.
// The attribute belongs to the kernel on the current device, so it is set once per kernel
// and device (a flag per device, for devices 0..63; others set it at every launch).
// `bytes` must be the same at every call for one kernel (all callers pass a constant of
// the kernel's template parameters). No stream operation: legal during graph capture.
template <auto kKernel>
inline cudaError_t allow_dynamic_smem(size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  static std::atomic<uint64_t> done_on_device{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (done_on_device.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess && bit != 0) done_on_device.fetch_or(bit, std::memory_order_acq_rel);
  return err;
}

}  // namespace cuda
}  // namespace did_engine
