// snapshot_remask on CUDA: per row, the num_remask[b] eligible positions of lowest
// confidence (ties to the lower index, NaN above every number) get mask_id in tokens and
// reset_value in confidence; their indices are returned ascending, padded with -1.
//
// Work decomposition
//   * One launch, one CTA (256 threads) per batch row; no host synchronisation, no
//     workspace, any row length (rows are re-read from global memory / L1 on each pass).
//   * Every position i gets a 64-bit rank (order_key(confidence[i]), i), where order_key
//     maps a float to a uint32 whose unsigned order is the number order (-0 == +0, every
//     NaN equal and above +inf). Ranks are distinct, so "the k smallest ranks" is exact.
//   * Pass 0: count the eligible positions E; k = clamp(num_remask[b], 0, min(E, max_k)).
//   * Passes 1-4: radix select on the 32-bit key, 8 bits at a time from the top: a 256-bin
//     shared-memory histogram of the eligible keys that match the digits chosen so far,
//     then one warp finds the bin holding the k-th smallest. This yields the k-th smallest
//     key T and how many positions with key == T to take (`equal_wanted`, lowest index first).
//   * Final pass, in index order, blockDim positions at a time: a position is selected if
//     its key < T, or its key == T and fewer than equal_wanted equal keys precede it (block
//     prefix sum). A second prefix sum over the selected flags gives each selected
//     position its output slot, so the indices come out sorted without a sort.

#include "common.cuh"

namespace did_engine {
namespace cuda {

constexpr int kRemaskThreads = 256;

// SnapshotRemaskParams is in launch.h.

// Order-preserving map of a float to uint32: a < b (as numbers) <=> key(a) < key(b);
// -0 and +0 map to the same key; every NaN maps to 0xFFFFFFFF, above +inf. Integer-only,
// so --use_fast_math (flush-to-zero compares) cannot change it.
__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t bits = __float_as_uint(x);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return 0xFFFFFFFFu;  // NaN
  if (magnitude == 0u) bits = 0u;                    // -0 -> +0
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__global__ void __launch_bounds__(kRemaskThreads) snapshot_remask_kernel(const SnapshotRemaskParams p) {
  __shared__ int histogram[256];
  __shared__ int scan_scratch[32];
  __shared__ uint32_t chosen_digit;
  __shared__ int chosen_rank;

  const int64_t b = blockIdx.x;
  const int S = p.seq_len;
  int64_t* tokens = p.tokens + b * p.tokens_strides[0];
  float* confidence = p.confidence + b * p.confidence_strides[0];
  const bool* eligible = p.eligible + b * p.eligible_strides[0];
  int64_t* out = p.out + b * p.max_k;
  auto is_eligible = [&](int i) { return eligible[i * p.eligible_strides[1]]; };
  auto key_at = [&](int i) { return order_key(confidence[i * p.confidence_strides[1]]); };

  // Pass 0: eligible count and the clamped request.
  int local_count = 0;
  for (int i = threadIdx.x; i < S; i += blockDim.x) local_count += is_eligible(i) ? 1 : 0;
  int eligible_count = 0;
  block_exclusive_scan(local_count, scan_scratch, eligible_count);
  const int64_t wanted = p.num_remask_is_int64
                             ? static_cast<const int64_t*>(p.num_remask)[b * p.num_remask_stride]
                             : static_cast<int64_t>(static_cast<const int32_t*>(p.num_remask)[b * p.num_remask_stride]);
  const int k = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(wanted, std::min(eligible_count, p.max_k))));

  if (k > 0) {
    // Passes 1-4: radix select of the k-th smallest key among eligible positions.
    // Invariant: `rank` (1-based) is the wanted key's rank among the eligible keys whose
    // high bits equal `prefix` under `prefix_mask`, and 1 <= rank <= their count.
    uint32_t prefix = 0, prefix_mask = 0;
    int rank = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += blockDim.x) histogram[i] = 0;
      __syncthreads();
      for (int i = threadIdx.x; i < S; i += blockDim.x) {
        if (!is_eligible(i)) continue;
        const uint32_t key = key_at(i);
        if ((key & prefix_mask) == prefix) atomicAdd(&histogram[(key >> shift) & 0xFFu], 1);
      }
      __syncthreads();
      if (threadIdx.x < 32) {
        // Lane l owns bins 8l .. 8l + 7; the lane whose range holds the rank picks the bin.
        const int lane = threadIdx.x;
        int bins[8];
        int lane_total = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          bins[j] = histogram[lane * 8 + j];
          lane_total += bins[j];
        }
        const int inclusive = warp_inclusive_scan(lane_total);
        int before = inclusive - lane_total;
        if (before < rank && rank <= inclusive) {
          int digit = lane * 8 + 7;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (rank <= before + bins[j]) {
              digit = lane * 8 + j;
              break;
            }
            before += bins[j];
          }
          chosen_digit = static_cast<uint32_t>(digit);
          chosen_rank = rank - before;
        }
      }
      __syncthreads();
      prefix |= chosen_digit << shift;
      prefix_mask |= 0xFFu << shift;
      rank = chosen_rank;
      // (chosen_* are next written after two more barriers, so no barrier is needed here.)
    }
    const uint32_t threshold = prefix;
    const int equal_wanted = rank;

    // Final pass: select in index order and write the results.
    int equal_seen = 0, selected_seen = 0;
    for (int base = 0; base < S; base += blockDim.x) {
      const int i = base + threadIdx.x;
      bool less = false, equal = false;
      if (i < S && is_eligible(i)) {
        const uint32_t key = key_at(i);
        less = key < threshold;
        equal = key == threshold;
      }
      int equal_total = 0, selected_total = 0;
      const int equal_before = equal_seen + block_exclusive_scan(equal ? 1 : 0, scan_scratch, equal_total);
      const bool selected = less || (equal && equal_before < equal_wanted);
      const int slot = selected_seen + block_exclusive_scan(selected ? 1 : 0, scan_scratch, selected_total);
      if (selected && slot < p.max_k) {
        out[slot] = i;
        tokens[i * p.tokens_strides[1]] = p.mask_id;
        confidence[i * p.confidence_strides[1]] = p.reset_value;
      }
      equal_seen += equal_total;
      selected_seen += selected_total;
    }
  }

  for (int slot = k + threadIdx.x; slot < p.max_k; slot += blockDim.x) out[slot] = -1;
}

cudaError_t launch_snapshot_remask(const SnapshotRemaskParams& p, cudaStream_t stream) {
  snapshot_remask_kernel<<<static_cast<unsigned>(p.batch), kRemaskThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace did_engine
