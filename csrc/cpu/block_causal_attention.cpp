// block_causal_attention on CPU.
//
// Query position p (in block j = p / block_size) sees keys [0, key_end(p)) with
// key_end(p) = min((j + 1) * block_size, S). A work item is a chunk of ~32 consecutive
// query rows (positions x the query heads of a kv head) of one batch row, for all kv
// heads. It streams the keys [0, key_end(last position)) once: the keys every row of the
// chunk sees (all but the last tile or so) with no mask at all, the few keys past them
// with a per-row limit applied to the score tile. Keys no row of the chunk sees are never
// read, so the work is about half that of dense attention at long sequences, and no
// [S, S] mask is ever built.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu/ops_cpu.h"
#include "cpu/attention_tile.h"

namespace did_engine {
namespace {

using namespace cpu_attention;

// Query rows (positions x heads of a group) per work item: enough to reuse each key tile
// many times, few enough for many items.
constexpr int64_t kTargetRows = 32;

// Splits the S query positions into chunks [begin, end) of about `positions` positions:
// whole query blocks grouped together when blocks are small, a block cut into equal parts
// when it is large. Chunks come out in increasing position (hence increasing cost).
std::vector<std::pair<int64_t, int64_t>> query_chunks(int64_t S, int64_t block_size, int64_t positions) {
  std::vector<std::pair<int64_t, int64_t>> chunks;
  if (block_size <= positions) {
    const int64_t span = positions / block_size * block_size;
    for (int64_t p = 0; p < S; p += span) chunks.emplace_back(p, std::min(p + span, S));
  } else {
    for (int64_t start = 0; start < S; start += block_size) {
      const int64_t len = std::min(block_size, S - start);
      const int64_t parts = ceil_div(len, positions);
      for (int64_t k = 0; k < parts; ++k)
        chunks.emplace_back(start + k * len / parts, start + (k + 1) * len / parts);
    }
  }
  return chunks;
}

template <typename T>
void causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t block_size, float scale,
                      at::Tensor& out) {
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t H_kv = k.size(2);
  const int64_t group = H / H_kv;
  const int64_t dp = round_up(D, kLanes);
  const int64_t positions = std::max<int64_t>(1, kTargetRows / group);
  const auto chunks = query_chunks(S, block_size, positions);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  int64_t max_rows = 0;
  for (const auto& [begin, end] : chunks) max_rows = std::max(max_rows, (end - begin) * group);

  const T* q_ptr = q.const_data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  auto key_end = [&](int64_t p) { return std::min((p / block_size + 1) * block_size, S); };

  struct Workspace {
    HeadsWorkspace heads;
    std::vector<int64_t> row_key_end;  // [rows]: row r sees keys < row_key_end[r]
  };
  // item = b * n_chunks + (n_chunks - 1 - c): one batch row at a time (its keys stay in
  // cache across its chunks), latest (costliest) chunks first.
  run_items(
      B * n_chunks, [&] { return Workspace{HeadsWorkspace(H_kv, max_rows, dp), std::vector<int64_t>(max_rows)}; },
      [&](int64_t item, Workspace& ws) {
        const int64_t b = item / n_chunks, c = n_chunks - 1 - item % n_chunks;
        const auto [p_begin, p_end] = chunks[c];
        const int64_t rows = (p_end - p_begin) * group;  // per kv head: row r = (p - p_begin) * group + hh

        ws.heads.begin(rows);
        for (int64_t g = 0; g < H_kv; ++g) {
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t p = p_begin + r / group, h = g * group + r % group;
            ws.heads.set_query(g, r, q_ptr + b * q.stride(0) + p * q.stride(1) + h * q.stride(2), D, scale);
          }
        }
        for (int64_t r = 0; r < rows; ++r) ws.row_key_end[r] = key_end(p_begin + r / group);

        // Keys [0, key_end(first position)) are seen by every row; the tiles past it are
        // masked per row, and keys no row sees are never read.
        const HeadKeys<T> keys{k.const_data_ptr<T>() + b * k.stride(0), v.const_data_ptr<T>() + b * v.stride(0),
                               k.stride(1), k.stride(2), v.stride(1), v.stride(2)};
        attend_heads(ws.heads, keys, 0, key_end(p_end - 1), D, ws.row_key_end.data());

        for (int64_t g = 0; g < H_kv; ++g) {
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t p = p_begin + r / group, h = g * group + r % group;
            float_row_to<T>(ws.heads.acc(g) + r * dp, 1.f / ws.heads.row_sum(g)[r], D,
                            out_ptr + ((b * S + p) * H + h) * D);
          }
        }
      });
}

}  // namespace

at::Tensor block_causal_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                      int64_t block_size, std::optional<double> scale) {
  constexpr const char* op = "block_causal_attention";
  check_block_causal_attention(q_in, k_in, v_in, block_size);
  DID_CHECK(q_in.device().is_cpu(), op, "q is on ", q_in.device(), ", not on the CPU (the CPU kernel was called)");
  const double softmax_scale = resolve_scale(scale, q_in.size(3), op);

  at::Tensor out = at::empty(q_in.sizes(), q_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  const at::Tensor q = with_unit_last_stride(q_in);
  const at::Tensor k = with_unit_last_stride(k_in);
  const at::Tensor v = with_unit_last_stride(v_in);
  // A block of S or more is one block (full attention); clamping keeps the position
  // arithmetic far from overflow for huge block sizes.
  block_size = std::min(block_size, q.size(1));
  const float scale_f = static_cast<float>(softmax_scale);
  switch (q.scalar_type()) {
    case at::kFloat:
      causal_attention<float>(q, k, v, block_size, scale_f, out);
      break;
    case at::kBFloat16:
      causal_attention<c10::BFloat16>(q, k, v, block_size, scale_f, out);
      break;
    case at::kHalf:
      causal_attention<c10::Half>(q, k, v, block_size, scale_f, out);
      break;
    default:
      TORCH_CHECK(false, op, ": unreachable dtype ", q.scalar_type());  // rejected by the checks
  }
  return out;
}

}  // namespace did_engine
