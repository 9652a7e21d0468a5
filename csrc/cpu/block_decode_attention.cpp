// block_decode_attention on CPU.
//
// One work item is a (batch row b, kv head g) pair: all n * (H / H_kv) query rows of that
// kv head attend together in one stream over its keys (the cache prefix, then the
// block's own keys), so K and V are read from memory exactly once. When there are too few
// pairs to keep every thread busy, each pair's key sequence is split into parts whose
// partial softmax states are merged afterwards (split-KV).

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

// A split gets at least this many keys, so that merging stays cheap next to the work.
constexpr int64_t kMinKeysPerSplit = 256;
// Work items wanted per thread before splitting the key sequence.
constexpr int64_t kItemsPerThread = 4;

template <typename T>
void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& k_block, const at::Tensor& v_block, const std::vector<int64_t>& lens,
                      float scale, at::Tensor& out) {
  const int64_t B = q.size(0), n = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t H_kv = k_cache.size(2);
  const int64_t group = H / H_kv;
  const int64_t rows = n * group;  // query rows per (b, g): row r = i * group + hh
  const int64_t dp = round_up(D, kLanes);

  const T* q_ptr = q.const_data_ptr<T>();
  const T* kc_ptr = k_cache.const_data_ptr<T>();
  const T* vc_ptr = v_cache.const_data_ptr<T>();
  const T* kb_ptr = k_block.const_data_ptr<T>();
  const T* vb_ptr = v_block.const_data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();

  // Splits per (b, g): enough items for every thread, never parts shorter than
  // kMinKeysPerSplit keys.
  const int64_t pairs = B * H_kv;
  const int64_t threads = at::get_num_threads();
  const int64_t max_keys = *std::max_element(lens.begin(), lens.end()) + n;
  int64_t splits = 1;
  if (pairs < kItemsPerThread * threads) {
    splits = std::min(ceil_div(kItemsPerThread * threads, pairs), ceil_div(max_keys, kMinKeysPerSplit));
    splits = std::max<int64_t>(splits, 1);
  }
  const int64_t items = pairs * splits;  // item = (b * H_kv + g) * splits + s

  // Partial states of every split: [items, rows, dp] accumulators, [items, rows] max/sum.
  std::vector<float> part_acc, part_max, part_sum;
  if (splits > 1) {
    part_acc.resize(items * rows * dp);
    part_max.resize(items * rows);
    part_sum.resize(items * rows);
  }

  auto out_row = [&](int64_t b, int64_t g, int64_t r) {
    const int64_t i = r / group, h = g * group + r % group;
    return out_ptr + ((b * n + i) * H + h) * D;
  };

  run_items(
      items, [&] { return RowWorkspace(rows, dp); },
      [&](int64_t item, RowWorkspace& ws) {
        const int64_t pair = item / splits, s = item % splits;
        const int64_t b = pair / H_kv, g = pair % H_kv;
        const int64_t len = lens[b];
        const int64_t total = len + n;
        const int64_t lo = s * total / splits, hi = (s + 1) * total / splits;

        // Scaled queries of this kv head, [rows, dp].
        float* q_rows = ws.q_rows();
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = r / group, h = g * group + r % group;
          row_to_float(q_ptr + b * q.stride(0) + i * q.stride(1) + h * q.stride(2), D, dp, scale, q_rows + r * dp);
        }
        ws.rows.reset(dp);

        // Keys [lo, hi) of the concatenation [cache[:len]; block].
        const KeyRange<T> cache{kc_ptr + b * k_cache.stride(0) + g * k_cache.stride(2),
                                vc_ptr + b * v_cache.stride(0) + g * v_cache.stride(2), k_cache.stride(1),
                                v_cache.stride(1), len};
        const KeyRange<T> block{kb_ptr + b * k_block.stride(0) + g * k_block.stride(2),
                                vb_ptr + b * v_block.stride(0) + g * v_block.stride(2), k_block.stride(1),
                                v_block.stride(1), n};
        if (lo < len) attend(ws.rows, cache.sub(lo, std::min(hi, len)), D, dp, ws.tiles);
        if (hi > len) attend(ws.rows, block.sub(std::max(lo, len) - len, hi - len), D, dp, ws.tiles);

        if (splits == 1) {
          for (int64_t r = 0; r < rows; ++r)
            float_row_to<T>(ws.rows.acc + r * dp, 1.f / ws.rows.row_sum[r], D, out_row(b, g, r));
        } else {
          std::copy(ws.rows.acc, ws.rows.acc + rows * dp, part_acc.data() + item * rows * dp);
          std::copy(ws.rows.row_max, ws.rows.row_max + rows, part_max.data() + item * rows);
          std::copy(ws.rows.row_sum, ws.rows.row_sum + rows, part_sum.data() + item * rows);
        }
      });

  if (splits == 1) return;
  // Merge the splits of each (b, g): rescale every part to the common max, then sum.
  at::parallel_for(0, pairs * rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(dp);
    for (int64_t pr = begin; pr < end; ++pr) {
      const int64_t pair = pr / rows, r = pr % rows;
      float max_all = kNegInf;
      for (int64_t s = 0; s < splits; ++s) max_all = std::max(max_all, part_max[(pair * splits + s) * rows + r]);
      std::fill(merged.begin(), merged.end(), 0.f);
      float sum_all = 0.f;
      for (int64_t s = 0; s < splits; ++s) {
        const int64_t part = (pair * splits + s) * rows + r;
        if (part_sum[part] == 0.f) continue;  // an empty split
        const float weight = std::exp(part_max[part] - max_all);
        sum_all += part_sum[part] * weight;
        const float* acc = part_acc.data() + part * dp;
        const Vec weight_vec(weight);
        for (int64_t c = 0; c < dp; c += kLanes)
          at::vec::fmadd(Vec::loadu(acc + c), weight_vec, Vec::loadu(merged.data() + c)).store(merged.data() + c);
      }
      float_row_to<T>(merged.data(), 1.f / sum_all, D, out_row(pair / H_kv, pair % H_kv, r));
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

  const at::Tensor q = last_dim_contiguous(q_in);
  const at::Tensor k_cache = last_dim_contiguous(k_cache_in);
  const at::Tensor v_cache = last_dim_contiguous(v_cache_in);
  const at::Tensor k_block = last_dim_contiguous(k_block_in);
  const at::Tensor v_block = last_dim_contiguous(v_block_in);
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
