// C++ driver for the standalone (CMake) build: calls every op through the dispatcher on
// random inputs, compares with an ATen composition in float64, and checks that bad input
// throws c10::ValueError. Its purpose is to run the kernels under sanitizers and debuggers
// without Python; the thorough tests are the pytest suite.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <utility>

namespace {

int failures = 0;
int checks = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

void expect_value_error(const std::function<void()>& call, const std::string& what) {
  bool raised = false;
  try {
    call();
  } catch (const c10::ValueError&) {
    raised = true;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception for %s: %s\n", what.c_str(), e.what());
  }
  expect(raised, what + " raises ValueError");
}

c10::OperatorHandle op(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

// Dense attention in float64: q [n, H, D], k/v [m, H_kv, D], mask [n, m] or undefined.
at::Tensor attention64(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                       const at::Tensor& mask) {
  const int64_t group = q.size(1) / k.size(1);
  auto kk = k.to(at::kDouble).repeat_interleave(group, 1).permute({1, 2, 0});  // [H, D, m]
  auto vv = v.to(at::kDouble).repeat_interleave(group, 1).permute({1, 0, 2});  // [H, m, D]
  auto scores = at::matmul(q.to(at::kDouble).permute({1, 0, 2}), kk) * scale;  // [H, n, m]
  if (mask.defined()) scores = scores.masked_fill(mask.logical_not(), -INFINITY);
  return at::matmul(at::softmax(scores, -1), vv).permute({1, 0, 2});  // [n, H, D]
}

void smoke_block_decode_attention() {
  const int64_t B = 3, n = 4, H = 6, H_kv = 2, D = 24, S_max = 37;
  auto q = at::randn({B, n, H, D});
  auto k_cache = at::randn({B, S_max, H_kv, D}), v_cache = at::randn({B, S_max, H_kv, D});
  auto k_block = at::randn({B, n, H_kv, D}), v_block = at::randn({B, n, H_kv, D});
  auto lens = at::tensor({0, 17, 37}, at::kInt);
  auto out = op("did_engine::block_decode_attention")
                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, std::optional<double>)>()
                 .call(q, k_cache, v_cache, k_block, v_block, lens, std::nullopt);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lens[b].item<int>();
    auto k = at::cat({k_cache[b].slice(0, 0, len), k_block[b]});
    auto v = at::cat({v_cache[b].slice(0, 0, len), v_block[b]});
    auto ref = attention64(q[b], k, v, scale, at::Tensor());
    expect((out[b].to(at::kDouble) - ref).abs().max().item<double>() < 1e-5, "block_decode_attention row values");
  }
  expect_value_error(
      [&] {
        op("did_engine::block_decode_attention")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, std::optional<double>)>()
            .call(q, k_cache, v_cache, k_block, v_block, at::tensor({0, 0, 38}, at::kInt), std::nullopt);
      },
      "block_decode_attention with cache_lens > S_max");
}

void smoke_block_causal_attention() {
  const int64_t B = 2, S = 13, H = 4, D = 16, block = 4;
  auto q = at::randn({B, S, H, D}), k = at::randn({B, S, H, D}), v = at::randn({B, S, H, D});
  auto call = op("did_engine::block_causal_attention")
                  .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                    std::optional<double>)>();
  auto out = call.call(q, k, v, block, std::nullopt);
  auto blocks = at::div(at::arange(S), block, "floor");  // block index of each position (int64)
  auto mask = blocks.unsqueeze(0) <= blocks.unsqueeze(1);
  for (int64_t b = 0; b < B; ++b) {
    auto ref = attention64(q[b], k[b], v[b], 1.0 / std::sqrt(static_cast<double>(D)), mask);
    expect((out[b].to(at::kDouble) - ref).abs().max().item<double>() < 1e-5, "block_causal_attention values");
  }
  expect_value_error([&] { call.call(q, k, v, 0, std::nullopt); }, "block_causal_attention with block_size 0");
}

void smoke_kv_commit() {
  auto k_cache = at::randn({2, 10, 3, 8}), v_cache = at::randn({2, 10, 3, 8});
  auto k_block = at::randn({2, 4, 3, 8}), v_block = at::randn({2, 4, 3, 8});
  auto lens = at::tensor({0, 6}, at::kInt);
  auto call = op("did_engine::kv_commit")
                  .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&)>();
  call.call(k_cache, v_cache, k_block, v_block, lens);
  expect(lens[1].item<int>() == 10, "kv_commit advances cache_lens");
  expect(at::equal(k_cache[1].slice(0, 6, 10), k_block[1]), "kv_commit writes k at the row's length");
  expect(at::equal(v_cache[0].slice(0, 0, 4), v_block[0]), "kv_commit writes v at the row's length");
  expect_value_error([&] { call.call(k_cache, v_cache, k_block, v_block, lens); }, "kv_commit overflow");
}

void smoke_snapshot_remask() {
  const int64_t B = 4, S = 1025, k = 100;
  auto tokens = at::randint(0, 50000, {B, S}, at::kLong);
  auto confidence = at::rand({B, S}).mul(8).floor();  // many ties
  auto eligible = at::arange(S).unsqueeze(0).ge(at::tensor({0, 5, 300, 900}, at::kLong).unsqueeze(1));
  auto counts = at::tensor({k, int64_t{0}, k, int64_t{125}}, at::kLong);
  auto conf_before = confidence.clone();
  auto call = op("did_engine::snapshot_remask")
                  .typed<at::Tensor(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                    double, int64_t)>();
  auto idx = call.call(tokens, confidence, counts, eligible, 50257, INFINITY, 125);
  // Stable sort of (ineligible -> +inf) confidences gives the lowest-first, lower-index-first order.
  auto keyed = conf_before.masked_fill(eligible.logical_not(), INFINITY);
  auto order = std::get<1>(at::sort(keyed, /*stable=*/true, /*dim=*/1, /*descending=*/false));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t count = counts[b].item<int64_t>();
    auto want = std::get<0>(at::sort(order[b].slice(0, 0, count)));
    expect(at::equal(idx[b].slice(0, 0, count), want), "snapshot_remask selected indices");
    expect(idx[b].slice(0, count).eq(-1).all().item<bool>(), "snapshot_remask pads with -1");
  }
  expect_value_error(
      [&] { call.call(tokens, confidence, at::tensor({1, 1, 1, 2000}, at::kLong), eligible, 50257, INFINITY, 2000); },
      "snapshot_remask with max_k > S");
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (auto [name, smoke] : {std::pair{"block_decode_attention", &smoke_block_decode_attention},
                             std::pair{"block_causal_attention", &smoke_block_causal_attention},
                             std::pair{"kv_commit", &smoke_kv_commit},
                             std::pair{"snapshot_remask", &smoke_snapshot_remask}}) {
    try {
      smoke();
    } catch (const std::exception& e) {
      expect(false, std::string(name) + " threw: " + std::string(e.what()).substr(0, 300));
    }
  }
  std::printf("did_engine_op_smoke: %d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
