// block_decode_attention on CPU.
//
// One work item is a batch row b: its keys (the cache prefix, then the block's own keys)
// stream once through memory, tile by tile, and every kv head's tile goes through all
// n * (H / H_kv) query rows of that head together, so K and V are read exactly once and
// sequentially. When there are too few rows to keep every thread busy, each row's key
// sequence is split into parts whose partial softmax states are merged afterwards
// (split-KV).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/attention_tile.h"

namespace did_engine {
namespace {

using namespace cpu_attention;

// A split gets at least this many keys (4 tiles), so that merging stays cheap next to the
// work.
constexpr int64_t kMinKeysPerSplit = 128;
// Work items wanted per thread before splitting the key sequence.
constexpr int64_t kItemsPerThread = 4;

template <typename T>
void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& k_block, const at::Tensor& v_block, const std::vector<int64_t>& lens,
                      float scale, at::Tensor& out) {
  const int64_t B = q.size(0), n = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t H_kv = k_cache.size(2);
  const int64_t group = H / H_kv;
  const int64_t rows = n * group;  // query rows per kv head: row r = i * group + hh
  const int64_t dp = round_up(D, kLanes);

  const T* q_ptr = q.const_data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();

  // Splits per batch row: enough items for every thread, parts of at least
  // kMinKeysPerSplit keys, and (with few items) a multiple of the thread count, so that
  // the last round of items does not leave threads idle.
  const int64_t threads = at::get_num_threads();
  const int64_t max_keys = *std::max_element(lens.begin(), lens.end()) + n;
  int64_t splits = 1;
  if (B < kItemsPerThread * threads) {
    splits = std::max<int64_t>(1, std::min(ceil_div(kItemsPerThread * threads, B), max_keys / kMinKeysPerSplit));
    while ((B * splits) % threads != 0 && splits < ceil_div(max_keys, kKeyTile)) ++splits;
  }

  const int64_t items = B * splits;  // item = b * splits + s: keys [lo, hi) of row b, all heads

  // Partial states of every split: [items, H_kv, rows, dp] accumulators, [items, H_kv,
  // rows] max and sum.
  // (Slot 1 of the calling thread's buffers; the workers' workspaces use slot 0.)
  float* part_acc = nullptr;
  float* part_max = nullptr;
  float* part_sum = nullptr;
  if (splits > 1) {
    const int64_t part_rows = items * H_kv * rows;
    part_acc = thread_buffer<1>(part_rows * (dp + 2));
    part_max = part_acc + part_rows * dp;
    part_sum = part_max + part_rows;
  }

  auto out_row = [&](int64_t b, int64_t g, int64_t r) {
    const int64_t i = r / group, h = g * group + r % group;
    return out_ptr + ((b * n + i) * H + h) * D;
  };

  run_items(
      items, [&] { return HeadsWorkspace(H_kv, rows, dp); },
      [&](int64_t item, HeadsWorkspace& ws) {
        const int64_t b = item / splits, s = item % splits;
        const int64_t len = lens[b];
        const int64_t total = len + n;
        const int64_t lo = s * total / splits, hi = (s + 1) * total / splits;

        ws.begin(rows);
        for (int64_t g = 0; g < H_kv; ++g) {
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = r / group, h = g * group + r % group;
            ws.set_query(g, r, q_ptr + b * q.stride(0) + i * q.stride(1) + h * q.stride(2), D, scale);
          }
        }

        // Keys [lo, hi) of the concatenation [cache[:len]; block].
        const HeadKeys<T> cache{k_cache.const_data_ptr<T>() + b * k_cache.stride(0),
                                v_cache.const_data_ptr<T>() + b * v_cache.stride(0),
                                k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2)};
        const HeadKeys<T> block{k_block.const_data_ptr<T>() + b * k_block.stride(0),
                                v_block.const_data_ptr<T>() + b * v_block.stride(0),
                                k_block.stride(1), k_block.stride(2), v_block.stride(1), v_block.stride(2)};
        if (lo < len) attend_heads(ws, cache, lo, std::min(hi, len), D, nullptr);
        if (hi > len) attend_heads(ws, block, std::max(lo, len) - len, hi - len, D, nullptr);

        for (int64_t g = 0; g < H_kv; ++g) {
          const float* acc = ws.acc(g);
          if (splits == 1) {
            for (int64_t r = 0; r < rows; ++r) float_row_to<T>(acc + r * dp, 1.f / ws.row_sum(g)[r], D, out_row(b, g, r));
          } else {
            const int64_t part = (item * H_kv + g) * rows;
            std::copy(acc, acc + rows * dp, part_acc + part * dp);
            std::copy(ws.row_max(g), ws.row_max(g) + rows, part_max + part);
            std::copy(ws.row_sum(g), ws.row_sum(g) + rows, part_sum + part);
          }
        }
      });

  if (splits == 1) return;
  // Merge the splits of each query row: rescale every part to the common max, then sum.
  const int64_t rows_per_b = H_kv * rows;
  constexpr int64_t kMergeGrain = 64;  // rows; small merges stay on the calling thread
  at::parallel_for(0, B * rows_per_b, kMergeGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(dp);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / rows_per_b, g = row % rows_per_b / rows, r = row % rows;
      auto part_of = [&](int64_t s) { return ((b * splits + s) * H_kv + g) * rows + r; };
      float max_all = kNegInf;
      for (int64_t s = 0; s < splits; ++s) max_all = std::max(max_all, part_max[part_of(s)]);
      std::fill(merged.begin(), merged.end(), 0.f);
      float sum_all = 0.f;
      for (int64_t s = 0; s < splits; ++s) {
        const int64_t part = part_of(s);
        if (part_sum[part] == 0.f) continue;  // an empty split
        const float weight = std::exp(part_max[part] - max_all);
        sum_all += part_sum[part] * weight;
        const float* acc = part_acc + part * dp;
        const Vec weight_vec(weight);
        for (int64_t c = 0; c < dp; c += kLanes)
          at::vec::fmadd(Vec::loadu(acc + c), weight_vec, Vec::loadu(merged.data() + c)).store(merged.data() + c);
      }
      float_row_to<T>(merged.data(), 1.f / sum_all, D, out_row(b, g, r));
    }
  });
}

at::Tensor block_decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_cache_in,
                                      const at::Tensor& v_cache_in, const at::Tensor& k_block_in,
                                      const at::Tensor& v_block_in, const at::Tensor& cache_lens,
                                      std::optional<double> scale) {
  constexpr const char* op = "block_decode_attention";
  check_block_decode_attention(q_in, k_cache_in, v_cache_in, k_block_in, v_block_in, cache_lens);
  DID_CHECK(q_in.device().is_cpu(), op, "the CPU kernel got tensors on ", q_in.device());
  const double softmax_scale = resolve_scale(scale, q_in.size(3), op);

  const int64_t B = q_in.size(0), S_max = k_cache_in.size(1);
  std::vector<int64_t> lens(B);
  const auto lens_acc = cache_lens.accessor<int32_t, 1>();
  for (int64_t b = 0; b < B; ++b) {
    lens[b] = lens_acc[b];
    DID_CHECK(lens[b] >= 0 && lens[b] <= S_max, op, "cache_lens[", b, "] = ", lens[b],
              " is outside the cache (valid lengths: 0..S_max=", S_max, ")");
  }

  at::Tensor out = at::empty(q_in.sizes(), q_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  const at::Tensor q = with_unit_last_stride(q_in);
  const at::Tensor k_cache = with_unit_last_stride(k_cache_in);
  const at::Tensor v_cache = with_unit_last_stride(v_cache_in);
  const at::Tensor k_block = with_unit_last_stride(k_block_in);
  const at::Tensor v_block = with_unit_last_stride(v_block_in);
  const float scale_f = static_cast<float>(softmax_scale);
  switch (q.scalar_type()) {
    case at::kFloat:
      decode_attention<float>(q, k_cache, v_cache, k_block, v_block, lens, scale_f, out);
      break;
    case at::kBFloat16:
      decode_attention<c10::BFloat16>(q, k_cache, v_cache, k_block, v_block, lens, scale_f, out);
      break;
    case at::kHalf:
      decode_attention<c10::Half>(q, k_cache, v_cache, k_block, v_block, lens, scale_f, out);
      break;
    default:
      TORCH_CHECK(false, op, ": unreachable dtype ", q.scalar_type());  // rejected by the checks
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(did_engine, CPU, m) { m.impl("block_decode_attention", &block_decode_attention_cpu); }

}  // namespace did_engine
