// block_decode_attention on CPU.
//
// A batch row's keys (the cache prefix, then the block's own keys) stream once through
// memory, tile by tile, and every kv head's tile goes through all n * (H / H_kv) query rows
// of that head together, so K and V are read exactly once and sequentially.
//
// Long rows are cut into splits of about kKeysPerSplit keys whose partial softmax states
// are merged at the end (split-KV), so that a few long rows still keep every thread busy.
// The splits of a row depend on its own key count only, and the merge adds them in split
// order, so a row's result does not depend on the other rows of the batch or on the
// thread count: threads only change which core computes a split, never the arithmetic.
// With many rows, a work item is a whole row (its splits computed one after the other and
// merged by the same thread, in a per-thread buffer); with few, a single split (partial
// states meet in a buffer shared by all threads).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/ops_cpu.h"
#include "cpu/attention_tile.h"

namespace did_engine {
namespace {

using namespace cpu_attention;

// Keys per split (8 tiles): merging costs ~1/kKeysPerSplit of the work.
constexpr int64_t kKeysPerSplit = 256;
// Whole rows are items when there are at least this many per thread.
constexpr int64_t kItemsPerThread = 4;

// Splits of a row of `keys` keys: a function of the row alone.
inline int64_t splits_of(int64_t keys) { return std::max<int64_t>(1, ceil_div(keys, kKeysPerSplit)); }

// Stores the state of a split (a "part"): accumulators [H_kv, rows, dp], then max and sum
// [H_kv, rows] each.
inline void save_part(HeadsWorkspace& ws, int64_t rows, float* part) {
  const int64_t heads = ws.heads(), dp = ws.dp();
  float* part_max = part + heads * rows * dp;
  float* part_sum = part_max + heads * rows;
  for (int64_t g = 0; g < heads; ++g) {
    std::copy(ws.acc(g), ws.acc(g) + rows * dp, part + g * rows * dp);
    std::copy(ws.row_max(g), ws.row_max(g) + rows, part_max + g * rows);
    std::copy(ws.row_sum(g), ws.row_sum(g) + rows, part_sum + g * rows);
  }
}

// Merges query row `row` (= g * rows + r) of `splits` consecutive parts (each part_floats
// apart, laid out as by save_part): every part rescaled to the common max and summed in
// split order. Leaves the unnormalised row in merged[0:dp]; returns its softmax sum.
inline float merge_parts(const float* parts, int64_t part_floats, int64_t splits, int64_t heads_rows, int64_t dp,
                         int64_t row, float* merged) {
  auto acc_of = [&](int64_t s) { return parts + s * part_floats + row * dp; };
  auto max_of = [&](int64_t s) { return parts[s * part_floats + heads_rows * dp + row]; };
  auto sum_of = [&](int64_t s) { return parts[s * part_floats + heads_rows * (dp + 1) + row]; };
  float max_all = kNegInf;
  for (int64_t s = 0; s < splits; ++s) max_all = std::max(max_all, max_of(s));
  std::fill(merged, merged + dp, 0.f);
  float sum_all = 0.f;
  for (int64_t s = 0; s < splits; ++s) {
    if (sum_of(s) == 0.f) continue;  // no key contributed
    const float weight = std::exp(max_of(s) - max_all);
    sum_all += sum_of(s) * weight;
    const Vec weight_vec(weight);
    for (int64_t c = 0; c < dp; c += kLanes)
      at::vec::fmadd(Vec::loadu(acc_of(s) + c), weight_vec, Vec::loadu(merged + c)).store(merged + c);
  }
  return sum_all;
}

template <typename T>
void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& k_block, const at::Tensor& v_block, const std::vector<int64_t>& lens,
                      float scale, at::Tensor& out) {
  const int64_t B = q.size(0), n = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t H_kv = k_cache.size(2);
  const int64_t group = H / H_kv;
  const int64_t rows = n * group;  // query rows per kv head: row r = i * group + hh
  const int64_t dp = round_up(D, kLanes);
  const int64_t heads_rows = H_kv * rows;
  const int64_t part_floats = heads_rows * (dp + 2);

  const T* q_ptr = q.const_data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();

  // first_split[b]: index of row b's first split among all rows' splits.
  std::vector<int64_t> first_split(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) first_split[b + 1] = first_split[b] + splits_of(lens[b] + n);
  const int64_t total_splits = first_split[B];
  const int64_t max_splits = [&] {
    int64_t m = 1;
    for (int64_t b = 0; b < B; ++b) m = std::max(m, first_split[b + 1] - first_split[b]);
    return m;
  }();

  auto out_row = [&](int64_t b, int64_t g, int64_t r) {
    const int64_t i = r / group, h = g * group + r % group;
    return out_ptr + ((b * n + i) * H + h) * D;
  };
  auto set_queries = [&](HeadsWorkspace& ws, int64_t b) {
    ws.begin(rows);
    for (int64_t g = 0; g < H_kv; ++g) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = r / group, h = g * group + r % group;
        ws.set_query(g, r, q_ptr + b * q.stride(0) + i * q.stride(1) + h * q.stride(2), D, scale);
      }
    }
  };
  // Split s of row b (state cleared first): keys [lo, hi) of [cache[:len]; block].
  auto attend_split = [&](HeadsWorkspace& ws, int64_t b, int64_t s) {
    const int64_t len = lens[b], total = len + n, splits = splits_of(total);
    const int64_t lo = s * total / splits, hi = (s + 1) * total / splits;
    ws.reset_state();
    const HeadKeys<T> cache{k_cache.const_data_ptr<T>() + b * k_cache.stride(0),
                            v_cache.const_data_ptr<T>() + b * v_cache.stride(0),
                            k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2)};
    const HeadKeys<T> block{k_block.const_data_ptr<T>() + b * k_block.stride(0),
                            v_block.const_data_ptr<T>() + b * v_block.stride(0),
                            k_block.stride(1), k_block.stride(2), v_block.stride(1), v_block.stride(2)};
    if (lo < len) attend_heads(ws, cache, lo, std::min(hi, len), D, nullptr);
    if (hi > len) attend_heads(ws, block, std::max(lo, len) - len, hi - len, D, nullptr);
  };
  auto write_unsplit = [&](HeadsWorkspace& ws, int64_t b) {
    for (int64_t g = 0; g < H_kv; ++g)
      for (int64_t r = 0; r < rows; ++r)
        float_row_to<T>(ws.acc(g) + r * dp, 1.f / ws.row_sum(g)[r], D, out_row(b, g, r));
  };
  auto write_merged = [&](const float* parts, int64_t b, float* merged) {
    const int64_t splits = first_split[b + 1] - first_split[b];
    for (int64_t row = 0; row < heads_rows; ++row) {
      const float sum = merge_parts(parts, part_floats, splits, heads_rows, dp, row, merged);
      float_row_to<T>(merged, 1.f / sum, D, out_row(b, row / rows, row % rows));
    }
  };

  const int64_t threads = at::get_num_threads();
  if (B >= kItemsPerThread * threads || total_splits == B) {
    // Item = a whole row; its splits' states go to this thread's buffer (slot 1; the
    // workspace uses slot 0).
    struct Workspace {
      HeadsWorkspace heads;
      float* parts;
      std::vector<float> merged;
    };
    run_items(
        B,
        [&] {
          return Workspace{HeadsWorkspace(H_kv, rows, dp),
                           max_splits > 1 ? thread_buffer<1>(max_splits * part_floats) : nullptr,
                           std::vector<float>(dp)};
        },
        [&](int64_t b, Workspace& ws) {
          const int64_t splits = first_split[b + 1] - first_split[b];
          set_queries(ws.heads, b);
          if (splits == 1) {
            attend_split(ws.heads, b, 0);
            write_unsplit(ws.heads, b);
            return;
          }
          for (int64_t s = 0; s < splits; ++s) {
            attend_split(ws.heads, b, s);
            save_part(ws.heads, rows, ws.parts + s * part_floats);
          }
          write_merged(ws.parts, b, ws.merged.data());
        });
    return;
  }

  // Item = one split; the states of all splits go to a shared buffer (slot 1 of the
  // calling thread's buffers), merged afterwards.
  float* parts = thread_buffer<1>(total_splits * part_floats);
  std::vector<int64_t> row_of_split(total_splits);
  for (int64_t b = 0; b < B; ++b) std::fill(row_of_split.begin() + first_split[b], row_of_split.begin() + first_split[b + 1], b);
  run_items(
      total_splits, [&] { return HeadsWorkspace(H_kv, rows, dp); },
      [&](int64_t item, HeadsWorkspace& ws) {
        const int64_t b = row_of_split[item], s = item - first_split[b];
        set_queries(ws, b);
        attend_split(ws, b, s);
        if (first_split[b + 1] - first_split[b] == 1) {
          write_unsplit(ws, b);
        } else {
          save_part(ws, rows, parts + item * part_floats);
        }
      });
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(dp);
    for (int64_t b = begin; b < end; ++b) {
      if (first_split[b + 1] - first_split[b] > 1) write_merged(parts + first_split[b] * part_floats, b, merged.data());
    }
  });
}

}  // namespace

at::Tensor block_decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_cache_in,
                                      const at::Tensor& v_cache_in, const at::Tensor& k_block_in,
                                      const at::Tensor& v_block_in, const at::Tensor& cache_lens,
                                      std::optional<double> scale) {
  constexpr const char* op = "block_decode_attention";
  check_block_decode_attention(q_in, k_cache_in, v_cache_in, k_block_in, v_block_in, cache_lens);
  DID_CHECK(q_in.device().is_cpu(), op, "q is on ", q_in.device(), ", not on the CPU (the CPU kernel was called)");
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

}  // namespace did_engine
