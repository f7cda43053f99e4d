// The small public helpers: views, dtypes, devices, names and parsers, the config, the version
// and the size of the saved state.
#include <gtest/gtest.h>
#include <omnimoe/omnimoe.h>

#include <string>
#include <vector>

#include "layer_harness.h"

namespace omnimoe::test {
namespace {

TEST(ApiTensorView, contiguous_matrix_and_empty) {
  float buf[24];
  const TensorView v = TensorView::contiguous(buf, DType::f32, {2, 3, 4});
  EXPECT_EQ(v.ndim, 3);
  EXPECT_EQ(v.size(0), 2);
  EXPECT_EQ(v.size(2), 4);
  EXPECT_EQ(v.stride(0), 12);
  EXPECT_EQ(v.stride(1), 4);
  EXPECT_EQ(v.stride(2), 1);
  EXPECT_EQ(v.numel(), 24);
  EXPECT_TRUE(v.is_contiguous());
  EXPECT_FALSE(v.empty());
  EXPECT_EQ(v.device, Device::cpu());

  const TensorView m = TensorView::matrix(buf, DType::bf16, 3, 5, 8, Device::cuda(1));
  EXPECT_EQ(m.ndim, 2);
  EXPECT_EQ(m.stride(0), 8);
  EXPECT_EQ(m.stride(1), 1);
  EXPECT_EQ(m.numel(), 15);
  EXPECT_FALSE(m.is_contiguous());  // padded rows
  EXPECT_EQ(m.device, Device::cuda(1));
  EXPECT_NE(m.device, Device::cuda(0));
  const TensorView dense = TensorView::matrix(buf, DType::f32, 3, 5, 5);
  EXPECT_TRUE(dense.is_contiguous());
  // A single row is contiguous whatever its row stride.
  EXPECT_TRUE(TensorView::matrix(buf, DType::f32, 1, 5, 9).is_contiguous());

  const TensorView none{};
  EXPECT_TRUE(none.empty());
  EXPECT_EQ(TensorView::contiguous(buf, DType::f32, {0, 7}).numel(), 0);

  const std::string msg = error_of([&] {
    TensorView::contiguous(buf, DType::f32, {1, 2, 3, 4, 5});
  });
  EXPECT_NE(msg.find("at most 4 dimensions"), std::string::npos) << msg;
  EXPECT_NE(msg.find("got 5"), std::string::npos) << msg;
}

TEST(ApiDType, names_and_sizes) {
  const std::pair<DType, std::pair<const char*, size_t>> table[] = {
      {DType::f32, {"f32", 4}}, {DType::f64, {"f64", 8}}, {DType::bf16, {"bf16", 2}},
      {DType::f16, {"f16", 2}}, {DType::i32, {"i32", 4}}, {DType::i64, {"i64", 8}},
      {DType::u8, {"u8", 1}}};
  for (const auto& [dtype, expect] : table) {
    EXPECT_STREQ(dtype_name(dtype), expect.first);
    EXPECT_EQ(dtype_size(dtype), expect.second) << expect.first;
  }
  EXPECT_STREQ(dtype_name(static_cast<DType>(42)), "unknown");
  const std::string msg = error_of([] { dtype_size(static_cast<DType>(42)); });
  EXPECT_NE(msg.find("unknown dtype 42"), std::string::npos) << msg;
}

TEST(ApiDevice, names) {
  EXPECT_STREQ(device_name(Device::cpu()), "cpu");
  EXPECT_STREQ(device_name(Device::cuda()), "cuda:0");
  EXPECT_STREQ(device_name(Device::cuda(7)), "cuda:7");
  EXPECT_STREQ(device_name(Device::cuda(12)), "cuda:?");
}

TEST(ApiNames, print_and_parse_round_trip) {
  for (Activation a : {Activation::silu, Activation::gelu, Activation::relu}) {
    EXPECT_EQ(parse_activation(activation_name(a)), a);
  }
  EXPECT_EQ(parse_activation("swish"), Activation::silu);
  for (Gating g : {Gating::softmax, Gating::joint}) EXPECT_EQ(parse_gating(gating_name(g)), g);
  for (RouterNorm n : {RouterNorm::batch, RouterNorm::none}) {
    EXPECT_EQ(parse_router_norm(router_norm_name(n)), n);
  }
  std::string msg = error_of([] { parse_activation("tanh"); });
  EXPECT_NE(msg.find("act"), std::string::npos) << msg;
  EXPECT_NE(msg.find("\"tanh\""), std::string::npos) << msg;
  msg = error_of([] { parse_gating("Softmax"); });
  EXPECT_NE(msg.find("gating"), std::string::npos) << msg;
  EXPECT_NE(msg.find("\"Softmax\""), std::string::npos) << msg;
  msg = error_of([] { parse_router_norm(""); });
  EXPECT_NE(msg.find("router_norm"), std::string::npos) << msg;
  EXPECT_NE(msg.find("got \"\""), std::string::npos) << msg;
}

TEST(ApiConfig, validate_and_describe) {
  LayerConfig c = make_config(1024, 320, 320, 512, 1024);
  EXPECT_NO_THROW(c.validate());
  EXPECT_EQ(c.num_experts(), 102400);
  EXPECT_EQ(c.describe(), "d=1024 grid=320x320 K=512 I=1024 act=silu gating=softmax norm=batch");
  c = make_config(37, 19, 23, 437, 0, Activation::gelu, Gating::joint, RouterNorm::none);
  EXPECT_NO_THROW(c.validate());  // K = N, no shared MLP
  EXPECT_EQ(c.describe(), "d=37 grid=19x23 K=437 I=0 act=gelu gating=joint norm=none");
  const LayerConfig defaults;
  EXPECT_EQ(defaults.act, Activation::silu);
  EXPECT_EQ(defaults.gating, Gating::softmax);
  EXPECT_EQ(defaults.router_norm, RouterNorm::batch);
  EXPECT_FLOAT_EQ(defaults.norm_eps, 1e-5f);
  EXPECT_FLOAT_EQ(defaults.norm_momentum, 0.1f);
  EXPECT_THROW(defaults.validate(), Error);  // d = 0
}

TEST(ApiVersion, matches_the_macros) {
  EXPECT_STREQ(version(), "0.1.0");
  EXPECT_EQ(std::to_string(OMNIMOE_VERSION_MAJOR) + "." + std::to_string(OMNIMOE_VERSION_MINOR) +
                "." + std::to_string(OMNIMOE_VERSION_PATCH),
            version());
}

// The saved state is O(T*K) for the routing (16 bytes per pair: indices, scores, gates,
// preact) plus O(T*(N_r+N_c+2I)) activations, plus a constant (the norm's rstd, alignment).
TEST(ApiSavedBytes, grows_with_T_times_K_and_the_activations) {
  for (DType dtype : {DType::f32, DType::bf16, DType::f64}) {
    for (int64_t inter : {int64_t{0}, int64_t{96}}) {
      const LayerConfig cfg = make_config(64, 19, 23, 37, inter);
      ASSERT_EQ(cfg.router_norm, RouterNorm::batch);
      const size_t esize = dtype_size(dtype);
      const int64_t per_token_act = (cfg.grid_rows + cfg.grid_cols) * 4 + 2 * inter * esize;
      const int64_t constant = (cfg.grid_rows + cfg.grid_cols) * 4 + 16 * 256;
      size_t previous = layer_saved_bytes(cfg, 0, dtype);
      EXPECT_GT(previous, 0u);  // the norm's rstd
      EXPECT_LE(previous, static_cast<size_t>(constant));
      for (int64_t T : {1, 2, 17, 256, 4096}) {
        const size_t bytes = layer_saved_bytes(cfg, T, dtype);
        const int64_t pairs = T * cfg.top_k;
        EXPECT_GE(bytes, static_cast<size_t>(16 * pairs + T * per_token_act))
            << dtype_name(dtype) << " T=" << T;
        EXPECT_LE(bytes, static_cast<size_t>(16 * pairs + T * per_token_act + constant))
            << dtype_name(dtype) << " T=" << T;
        EXPECT_GT(bytes, previous);
        previous = bytes;
      }
      // Doubling T doubles the T-dependent part (up to alignment).
      const double a = static_cast<double>(layer_saved_bytes(cfg, 8192, dtype) -
                                           layer_saved_bytes(cfg, 0, dtype));
      const double b = static_cast<double>(layer_saved_bytes(cfg, 4096, dtype) -
                                           layer_saved_bytes(cfg, 0, dtype));
      EXPECT_NEAR(a / b, 2.0, 0.01);
    }
  }
}

TEST(ApiSavedViews, carve_the_buffer_without_overlap) {
  const LayerConfig cfg = make_config(16, 5, 7, 4, 12);
  const int64_t T = 9;
  Bytes saved(layer_saved_bytes(cfg, T, DType::bf16));
  const LayerSaved s = layer_saved_views(cfg, T, DType::bf16, saved.buffer(), Device::cpu());
  struct Range {
    const char* name;
    const TensorView* v;
  };
  const Range ranges[] = {{"indices", &s.routing.indices},
                          {"scores", &s.routing.scores},
                          {"gates", &s.routing.gates},
                          {"preact", &s.expert_preact},
                          {"row_logits", &s.router.row_logits},
                          {"col_logits", &s.router.col_logits},
                          {"row_rstd", &s.router.row_rstd},
                          {"col_rstd", &s.router.col_rstd},
                          {"gate_pre", &s.mlp.gate_pre},
                          {"up_pre", &s.mlp.up_pre}};
  const uint8_t* base = saved.v.data();
  const uint8_t* end = base + saved.v.size();
  std::vector<std::pair<const uint8_t*, const uint8_t*>> spans;
  for (const Range& r : ranges) {
    const auto* p = static_cast<const uint8_t*>(r.v->data);
    const uint8_t* q = p + r.v->numel() * static_cast<int64_t>(dtype_size(r.v->dtype));
    EXPECT_GE(p, base) << r.name;
    EXPECT_LE(q, end) << r.name;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 16, 0u) << r.name;
    EXPECT_TRUE(r.v->is_contiguous()) << r.name;
    for (const auto& [a, b] : spans) EXPECT_TRUE(q <= a || p >= b) << r.name << " overlaps";
    spans.push_back({p, q});
  }
  EXPECT_EQ(s.mlp.gate_pre.dtype, DType::bf16);
  EXPECT_EQ(s.routing.indices.dtype, DType::i32);
  EXPECT_EQ(s.routing.indices.shape[1], 4);
  EXPECT_EQ(s.expert_preact.shape[1], 4);
}

}  // namespace
}  // namespace omnimoe::test
