#include <algorithm>
#include <cmath>
#include <cstdio>

#include "baselines/cuda_util.cuh"
#include "compare/compare_kernels.cuh"
#include "compare/compare_methods.cuh"
#include "cuda/gemm.h"
#include "host_array.h"
#include "layer_setup.h"

namespace omnimoe::tool::compare {

namespace {

constexpr int64_t kHidden = 1024;

// Device tensors of one method; every byte goes through the Platform so peak memory is known.
class Store {
 public:
  explicit Store(Platform& p) : p_(p) {}
  TensorView matrix(DType dt, int64_t rows, int64_t cols) {
    arrays_.emplace_back(p_,
                         std::max<size_t>(1, static_cast<size_t>(rows * cols) * dtype_size(dt)));
    return TensorView::contiguous(arrays_.back().data(), dt, {rows, cols}, p_.device());
  }
  TensorView vector(DType dt, int64_t n) {
    arrays_.emplace_back(p_, std::max<size_t>(1, static_cast<size_t>(n) * dtype_size(dt)));
    return TensorView::contiguous(arrays_.back().data(), dt, {n}, p_.device());
  }
  Buffer buffer(size_t bytes) {
    arrays_.emplace_back(p_, std::max<size_t>(bytes, 256));
    return arrays_.back().buffer();
  }

 private:
  Platform& p_;
  std::vector<DeviceArray> arrays_;
};

size_t bytes_of(const TensorView& t) {
  return static_cast<size_t>(t.numel()) * dtype_size(t.dtype);
}

std::vector<double> download(Platform& p, const TensorView& t, int64_t offset, int64_t count) {
  HostArray h(t.dtype, count);
  p.copy_to_host(h.data(), static_cast<const char*>(t.data) + offset * dtype_size(t.dtype),
                 h.bytes());
  return h.to_vector();
}

double bf16_round(double v) {
  HostArray h(DType::bf16, 1);
  h.set(0, v);
  return h.get(0);
}

double silu(double v) { return v / (1.0 + std::exp(-v)); }

std::string format_error(const char* what, double err, double tol, bool& failed) {
  char buf[160];
  const bool bad = !(err <= tol);
  failed = failed || bad;
  std::snprintf(buf, sizeof buf, "%s: relative L2 error %.2e (tolerance %.0e)%s", what, err, tol,
                bad ? " FAILED" : "");
  return buf;
}

double relative_l2(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Host SwiGLU of one row: W_gu [2F, d] (gate rows then up rows) and W_down [d, F], as the
// device rounds (bf16 pre-activations and activations).
std::vector<double> host_swiglu(const std::vector<double>& x, const std::vector<double>& gate,
                                const std::vector<double>& up, const std::vector<double>& down,
                                int64_t f, int64_t d) {
  std::vector<double> a(static_cast<size_t>(f));
  for (int64_t j = 0; j < f; ++j) {
    double g = 0.0, u = 0.0;
    for (int64_t c = 0; c < d; ++c) {
      g += gate[j * d + c] * x[c];
      u += up[j * d + c] * x[c];
    }
    a[j] = bf16_round(silu(bf16_round(g)) * bf16_round(u));
  }
  std::vector<double> y(static_cast<size_t>(d), 0.0);
  for (int64_t c = 0; c < d; ++c) {
    for (int64_t j = 0; j < f; ++j) y[c] += down[c * f + j] * a[j];
  }
  return y;
}

// dx of the host SwiGLU above for an output gradient dy (fp64, no rounding).
std::vector<double> host_swiglu_dx(const std::vector<double>& x, const std::vector<double>& dy,
                                   const std::vector<double>& gate, const std::vector<double>& up,
                                   const std::vector<double>& down, int64_t f, int64_t d) {
  std::vector<double> dx(static_cast<size_t>(d), 0.0);
  for (int64_t j = 0; j < f; ++j) {
    double g = 0.0, u = 0.0, da = 0.0;
    for (int64_t c = 0; c < d; ++c) {
      g += gate[j * d + c] * x[c];
      u += up[j * d + c] * x[c];
      da += down[c * f + j] * dy[c];
    }
    const double s = 1.0 / (1.0 + std::exp(-g));
    const double dg = da * u * s * (1.0 + g * (1.0 - s)), du = da * g * s;
    for (int64_t c = 0; c < d; ++c) dx[c] += gate[j * d + c] * dg + up[j * d + c] * du;
  }
  return dx;
}

// --- Dense SwiGLU: the library's MLP op -------------------------------------------------------

class DenseMethod : public Method {
 public:
  DenseMethod(Platform& p, int64_t tokens, int64_t inter, uint64_t seed) : p_(p), st_(p) {
    const int64_t T = tokens, d = kHidden;
    cfg_.hidden = d;
    cfg_.grid_rows = cfg_.grid_cols = 1;
    cfg_.top_k = 1;
    cfg_.intermediate = inter;
    exec_ = p.exec();
    x_ = st_.matrix(DType::bf16, T, d);
    dy_ = st_.matrix(DType::bf16, T, d);
    y_ = st_.matrix(DType::bf16, T, d);
    dx_ = st_.matrix(DType::bf16, T, d);
    w_ = {st_.matrix(DType::bf16, inter, d), st_.matrix(DType::bf16, inter, d),
          st_.matrix(DType::bf16, d, inter)};
    g_ = {st_.matrix(DType::bf16, inter, d), st_.matrix(DType::bf16, inter, d),
          st_.matrix(DType::bf16, d, inter)};
    saved_ = {st_.matrix(DType::bf16, T, inter), st_.matrix(DType::bf16, T, inter)};
    ws_ = st_.buffer(std::max(mlp_forward_workspace_bytes(cfg_, T, DType::bf16, exec_),
                              mlp_backward_workspace_bytes(cfg_, T, DType::bf16, exec_)));
    param_bytes = 3 * bytes_of(w_.gate);
    const float a = 1.0f / std::sqrt(static_cast<float>(d)),
                b = 1.0f / std::sqrt(static_cast<float>(inter));
    p.fill_uniform(x_, seed, -1, 1);
    p.fill_uniform(dy_, seed + 1, -1, 1);
    p.fill_uniform(w_.gate, seed + 2, -a, a);
    p.fill_uniform(w_.up, seed + 3, -a, a);
    p.fill_uniform(w_.down, seed + 4, -b, b);
  }
  void forward() override { mlp_forward(cfg_, x_, w_, y_, false, saved_, ws_, exec_); }
  void backward() override { mlp_backward(cfg_, x_, w_, saved_, dy_, dx_, false, g_, ws_, exec_); }
  TensorView output() const override { return y_; }
  TensorView input_grad() const override { return dx_; }
  std::string note() override { return "library mlp_forward/mlp_backward (cuBLASLt)"; }

 private:
  Platform& p_;
  Store st_;
  LayerConfig cfg_;
  Exec exec_;
  TensorView x_, dy_, y_, dx_;
  MlpWeights w_, g_;
  MlpSaved saved_;
  Buffer ws_;
};

// --- GShard / DeepSeekMoE: softmax top-K router, capacity layout, batched expert GEMMs --------

class CoarseMoeMethod : public Method {
 public:
  CoarseMoeMethod(Platform& p, int64_t tokens, int experts, int64_t ffn, int k, int64_t shared,
                  bool renorm, uint64_t seed)
      : p_(p), st_(p), T_(tokens), E_(experts), F_(ffn), K_(k), I_(shared), renorm_(renorm) {
    const int64_t d = kHidden;
    // Twice the mean load, in multiples of 16 rows: with a balanced router almost nothing drops
    // (dropped pairs are counted and reported).
    const int64_t mean = (T_ * K_ + E_ - 1) / E_;
    C_ = (2 * mean + 15) / 16 * 16;
    const int64_t R = E_ * C_;
    exec_ = p.exec();
    stream_ = static_cast<cudaStream_t>(exec_.stream);
    x_ = st_.matrix(DType::bf16, T_, d);
    dy_ = st_.matrix(DType::bf16, T_, d);
    y_ = st_.matrix(DType::bf16, T_, d);
    dx_ = st_.matrix(DType::bf16, T_, d);
    wg_ = st_.matrix(DType::bf16, E_, d);
    w1_ = st_.matrix(DType::bf16, E_ * 2 * F_, d);
    w2_ = st_.matrix(DType::bf16, E_ * d, F_);
    dwg_ = st_.matrix(DType::bf16, E_, d);
    dw1_ = st_.matrix(DType::bf16, E_ * 2 * F_, d);
    dw2_ = st_.matrix(DType::bf16, E_ * d, F_);
    probs_ = st_.matrix(DType::f32, T_, E_);
    sel_e_ = st_.matrix(DType::i32, T_, K_);
    sel_g_ = st_.matrix(DType::f32, T_, K_);
    rows_ = st_.matrix(DType::i32, T_, K_);
    slot_pair_ = st_.vector(DType::i32, R);
    counts_ = st_.vector(DType::i32, E_ + 1);  // the last entry counts dropped pairs
    xp_ = st_.matrix(DType::bf16, R, d);
    h_ = st_.matrix(DType::bf16, R, 2 * F_);  // backward: dH in place
    a_ = st_.matrix(DType::bf16, R, F_);      // backward: dA
    yp_ = st_.matrix(DType::bf16, R, d);
    dyp_ = st_.matrix(DType::bf16, R, d);  // backward: g * dy, then dX per slot
    dg_ = st_.matrix(DType::f32, T_, K_);
    dlogits_ = st_.matrix(DType::bf16, T_, E_);
    size_t ws = std::max(cuda::gemm_workspace_bytes(), BatchedGemm::workspace_bytes());
    if (I_ > 0) {
      scfg_.hidden = d;
      scfg_.grid_rows = scfg_.grid_cols = 1;
      scfg_.top_k = 1;
      scfg_.intermediate = I_;
      sw_ = {st_.matrix(DType::bf16, I_, d), st_.matrix(DType::bf16, I_, d),
             st_.matrix(DType::bf16, d, I_)};
      sg_ = {st_.matrix(DType::bf16, I_, d), st_.matrix(DType::bf16, I_, d),
             st_.matrix(DType::bf16, d, I_)};
      ssaved_ = {st_.matrix(DType::bf16, T_, I_), st_.matrix(DType::bf16, T_, I_)};
      ws = std::max({ws, mlp_forward_workspace_bytes(scfg_, T_, DType::bf16, exec_),
                     mlp_backward_workspace_bytes(scfg_, T_, DType::bf16, exec_)});
    }
    ws_ = st_.buffer(ws);
    param_bytes =
        bytes_of(wg_) + bytes_of(w1_) + bytes_of(w2_) + (I_ > 0 ? 3 * bytes_of(sw_.gate) : 0);
    const float a = std::sqrt(3.0f / static_cast<float>(d)),
                b = 1.0f / std::sqrt(static_cast<float>(d)),
                c = 1.0f / std::sqrt(static_cast<float>(F_));
    p.fill_uniform(x_, seed, -1, 1);
    p.fill_uniform(dy_, seed + 1, -1, 1);
    p.fill_uniform(wg_, seed + 2, -a, a);
    p.fill_uniform(w1_, seed + 3, -b, b);
    p.fill_uniform(w2_, seed + 4, -c, c);
    if (I_ > 0) {
      const float e = 1.0f / std::sqrt(static_cast<float>(I_));
      p.fill_uniform(sw_.gate, seed + 5, -b, b);
      p.fill_uniform(sw_.up, seed + 6, -b, b);
      p.fill_uniform(sw_.down, seed + 7, -e, e);
    }
  }

  void forward() override {
    const int64_t d = kHidden, R = E_ * C_;
    auto* ws = ws_.data;
    const size_t wsb = ws_.bytes;
    TOOL_CUDA_CHECK(cudaMemsetAsync(counts_.data, 0, bytes_of(counts_), stream_));
    TOOL_CUDA_CHECK(cudaMemsetAsync(slot_pair_.data, 0xff, bytes_of(slot_pair_), stream_));
    cuda::gemm(x_, false, wg_, true, probs_, 1.0f, 0.0f, ws_, exec_);
    moe_route(f32(probs_), T_, E_, K_, C_, renorm_, i32(sel_e_), f32(sel_g_), i32(rows_),
              i32(slot_pair_), i32(counts_), i32(counts_) + E_, stream_);
    moe_dispatch(b16(x_), i32(slot_pair_), nullptr, K_, R, d, b16(xp_), stream_);
    gemm_.run(b16(xp_), false, C_ * d, b16(w1_), true, 2 * F_ * d, b16(h_), C_ * 2 * F_, C_, 2 * F_,
              d, E_, false, ws, wsb, stream_);
    swiglu_rows_forward(b16(h_), b16(a_), R, F_, stream_);
    gemm_.run(b16(a_), false, C_ * F_, b16(w2_), true, d * F_, b16(yp_), C_ * d, C_, d, F_, E_,
              false, ws, wsb, stream_);
    gather_weighted_sum(b16(yp_), i32(rows_), f32(sel_g_), T_, K_, d, b16(y_), stream_);
    if (I_ > 0) mlp_forward(scfg_, x_, sw_, y_, true, ssaved_, ws_, exec_);
  }

  void backward() override {
    const int64_t d = kHidden, R = E_ * C_;
    auto* ws = ws_.data;
    const size_t wsb = ws_.bytes;
    gather_dot(b16(dy_), b16(yp_), i32(rows_), T_, K_, d, f32(dg_), stream_);
    moe_dispatch(b16(dy_), i32(slot_pair_), f32(sel_g_), K_, R, d, b16(dyp_), stream_);
    // dW2[e] = dYp[e]^T A[e]; then dA[e] = dYp[e] W2[e] over A.
    gemm_.run(b16(dyp_), true, C_ * d, b16(a_), false, C_ * F_, b16(dw2_), d * F_, d, F_, C_, E_,
              false, ws, wsb, stream_);
    gemm_.run(b16(dyp_), false, C_ * d, b16(w2_), false, d * F_, b16(a_), C_ * F_, C_, F_, d, E_,
              false, ws, wsb, stream_);
    swiglu_rows_backward(b16(h_), b16(a_), b16(h_), R, F_, stream_);
    // dW1[e] = dH[e]^T Xp[e]; dXp[e] = dH[e] W1[e] over dYp.
    gemm_.run(b16(h_), true, C_ * 2 * F_, b16(xp_), false, C_ * d, b16(dw1_), 2 * F_ * d, 2 * F_, d,
              C_, E_, false, ws, wsb, stream_);
    gemm_.run(b16(h_), false, C_ * 2 * F_, b16(w1_), false, 2 * F_ * d, b16(dyp_), C_ * d, C_, d,
              2 * F_, E_, false, ws, wsb, stream_);
    gather_weighted_sum(b16(dyp_), i32(rows_), nullptr, T_, K_, d, b16(dx_), stream_);
    moe_router_backward(f32(probs_), i32(sel_e_), f32(sel_g_), f32(dg_), T_, E_, K_, renorm_,
                        b16(dlogits_), stream_);
    cuda::gemm(dlogits_, false, wg_, false, dx_, 1.0f, 1.0f, ws_, exec_);
    cuda::gemm(dlogits_, true, x_, false, dwg_, 1.0f, 0.0f, ws_, exec_);
    if (I_ > 0) mlp_backward(scfg_, x_, sw_, ssaved_, dy_, dx_, true, sg_, ws_, exec_);
  }

  TensorView output() const override { return y_; }
  TensorView input_grad() const override { return dx_; }

  std::string note() override {
    int32_t drops = 0;
    p_.copy_to_host(&drops, static_cast<int32_t*>(counts_.data) + E_, sizeof drops);
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "E=%d F=%lld K=%d%s; capacity %lld rows/expert (2x mean load, %.2fx padded "
                  "rows in the batched GEMMs); %d of %lld pairs dropped",
                  E_, static_cast<long long>(F_), K_,
                  I_ > 0 ? (" shared FFN " + std::to_string(I_)).c_str() : "",
                  static_cast<long long>(C_),
                  static_cast<double>(E_ * C_) / static_cast<double>(T_ * K_), drops,
                  static_cast<long long>(T_ * K_));
    return buf;
  }

  std::string check(bool& failed) override {
    const int64_t d = kHidden;
    p_.synchronize();
    std::vector<double> got, want, got_dx, want_dx;
    bool routing_ok = true;
    const auto wg = download(p_, wg_, 0, E_ * d);
    for (const int64_t t : {int64_t{0}, T_ / 2, T_ - 1}) {
      const auto x = download(p_, x_, t * d, d);
      const auto dy = download(p_, dy_, t * d, d);
      std::vector<double> dx(static_cast<size_t>(d), 0.0), dgate(static_cast<size_t>(K_), 0.0);
      const auto probs = download(p_, probs_, t * E_, E_);
      const auto sel = download(p_, sel_e_, t * K_, K_);
      const auto gate = download(p_, sel_g_, t * K_, K_);
      const auto rows = download(p_, rows_, t * K_, K_);
      // The selection is the top K of the softmax.
      std::vector<double> sorted = probs;
      std::sort(sorted.rbegin(), sorted.rend());
      double sum = 0.0;
      for (int k = 0; k < K_; ++k) {
        routing_ok = routing_ok && probs[static_cast<size_t>(sel[k])] >= sorted[K_ - 1];
        sum += probs[static_cast<size_t>(sel[k])];
      }
      std::vector<double> y(static_cast<size_t>(d), 0.0);
      for (int k = 0; k < K_; ++k) {
        if (rows[k] < 0) continue;
        const int64_t e = static_cast<int64_t>(sel[k]);
        const double g = renorm_ ? probs[e] / sum : probs[e];
        routing_ok = routing_ok && std::fabs(g - gate[k]) <= 1e-5 + 1e-4 * std::fabs(g);
        const auto gate_w = download(p_, w1_, e * 2 * F_ * d, F_ * d);
        const auto up_w = download(p_, w1_, (e * 2 * F_ + F_) * d, F_ * d);
        const auto down_w = download(p_, w2_, e * d * F_, d * F_);
        const auto ye = host_swiglu(x, gate_w, up_w, down_w, F_, d);
        for (int64_t c = 0; c < d; ++c) y[c] += gate[k] * bf16_round(ye[c]);
        // Backward through the expert (dy scaled by the gate) and to the gate.
        std::vector<double> dye(static_cast<size_t>(d));
        for (int64_t c = 0; c < d; ++c) {
          dye[c] = gate[k] * dy[c];
          dgate[k] += dy[c] * ye[c];
        }
        const auto dxe = host_swiglu_dx(x, dye, gate_w, up_w, down_w, F_, d);
        for (int64_t c = 0; c < d; ++c) dx[c] += dxe[c];
      }
      // Router: gates -> probabilities (renormalised or not) -> softmax -> logits -> x.
      double S = 0.0, G = 0.0;
      for (int k = 0; k < K_; ++k) {
        S += probs[static_cast<size_t>(sel[k])];
        G += gate[k] * dgate[k];
      }
      std::vector<double> dp(static_cast<size_t>(E_), 0.0);
      for (int k = 0; k < K_; ++k)
        dp[static_cast<size_t>(sel[k])] = renorm_ ? (dgate[k] - G) / S : dgate[k];
      double D = 0.0;
      for (int64_t j = 0; j < E_; ++j) D += probs[j] * dp[j];
      for (int64_t j = 0; j < E_; ++j) {
        const double dl = probs[j] * (dp[j] - D);
        for (int64_t c = 0; c < d; ++c) dx[c] += dl * wg[j * d + c];
      }
      if (I_ > 0) {
        const auto sg = download(p_, sw_.gate, 0, I_ * d), su = download(p_, sw_.up, 0, I_ * d),
                   sd = download(p_, sw_.down, 0, d * I_);
        const auto ys = host_swiglu(x, sg, su, sd, I_, d);
        for (int64_t c = 0; c < d; ++c) y[c] += ys[c];
        const auto dxs = host_swiglu_dx(x, dy, sg, su, sd, I_, d);
        for (int64_t c = 0; c < d; ++c) dx[c] += dxs[c];
      }
      const auto dev = download(p_, y_, t * d, d);
      got.insert(got.end(), dev.begin(), dev.end());
      want.insert(want.end(), y.begin(), y.end());
      const auto dev_dx = download(p_, dx_, t * d, d);
      got_dx.insert(got_dx.end(), dev_dx.begin(), dev_dx.end());
      want_dx.insert(want_dx.end(), dx.begin(), dx.end());
    }
    if (!routing_ok) failed = true;
    return std::string(routing_ok ? "routing matches the host top-K; " : "routing FAILED; ") +
           format_error("forward of 3 tokens vs host", relative_l2(got, want), 2e-2, failed) +
           "; " + format_error("dx of 3 tokens", relative_l2(got_dx, want_dx), 3e-2, failed);
  }

 private:
  static float* f32(const TensorView& t) { return static_cast<float*>(t.data); }
  static int32_t* i32(const TensorView& t) { return static_cast<int32_t*>(t.data); }
  static bf16* b16(const TensorView& t) { return static_cast<bf16*>(t.data); }

  Platform& p_;
  Store st_;
  int64_t T_;
  int E_;
  int64_t F_;
  int K_;
  int64_t I_;
  bool renorm_;
  int64_t C_ = 0;
  Exec exec_;
  cudaStream_t stream_ = nullptr;
  TensorView x_, dy_, y_, dx_, wg_, w1_, w2_, dwg_, dw1_, dw2_, probs_, sel_e_, sel_g_, rows_,
      slot_pair_, counts_, xp_, h_, a_, yp_, dyp_, dg_, dlogits_;
  LayerConfig scfg_;
  MlpWeights sw_, sg_;
  MlpSaved ssaved_;
  Buffer ws_;
  BatchedGemm gemm_;
};

// --- PKM: the library's product-key router over 444 x 444 keys, a gather of value rows --------

class PkmMethod : public Method {
 public:
  PkmMethod(Platform& p, int64_t tokens, int64_t k, uint64_t seed) : p_(p), st_(p), T_(tokens) {
    const int64_t d = kHidden;
    cfg_.hidden = d;
    cfg_.grid_rows = cfg_.grid_cols = 444;
    cfg_.top_k = k;
    cfg_.intermediate = 0;
    cfg_.router_norm = RouterNorm::batch;  // PKM's query batch norm
    cfg_.gating = Gating::softmax;
    cfg_.validate();
    exec_ = p.exec();
    stream_ = static_cast<cudaStream_t>(exec_.stream);
    const int64_t N = cfg_.num_experts(), n = cfg_.grid_rows;
    x_ = st_.matrix(DType::bf16, T_, d);
    dy_ = st_.matrix(DType::bf16, T_, d);
    y_ = st_.matrix(DType::bf16, T_, d);
    dx_ = st_.matrix(DType::bf16, T_, d);
    rw_ = {st_.matrix(DType::bf16, n, d), st_.matrix(DType::bf16, n, d)};
    rg_ = {st_.matrix(DType::bf16, n, d), st_.matrix(DType::bf16, n, d)};
    values_ = st_.matrix(DType::bf16, N, d);
    dvalues_ = st_.matrix(DType::bf16, N, d);
    norm_ = {st_.vector(DType::f32, n), st_.vector(DType::f32, n), st_.vector(DType::f32, n),
             st_.vector(DType::f32, n)};
    out_ = {st_.matrix(DType::i32, T_, k), st_.matrix(DType::f32, T_, k),
            st_.matrix(DType::f32, T_, k)};
    saved_ = {st_.matrix(DType::f32, T_, n), st_.matrix(DType::f32, T_, n),
              st_.vector(DType::f32, n), st_.vector(DType::f32, n)};
    sched_ = {st_.vector(DType::i32, N + 1), st_.vector(DType::i32, T_ * k)};
    dgates_ = st_.matrix(DType::f32, T_, k);
    ws_ = st_.buffer(std::max({router_forward_workspace_bytes(cfg_, T_, DType::bf16, exec_),
                               router_backward_workspace_bytes(cfg_, T_, DType::bf16, exec_),
                               schedule_workspace_bytes(cfg_, T_, exec_)}));
    param_bytes = 2 * bytes_of(rw_.row) + bytes_of(values_);
    const float a = std::sqrt(3.0f / static_cast<float>(d));
    p.fill_uniform(x_, seed, -1, 1);
    p.fill_uniform(dy_, seed + 1, -1, 1);
    p.fill_uniform(rw_.row, seed + 2, -a, a);
    p.fill_uniform(rw_.col, seed + 3, -a, a);
    p.fill_uniform(values_, seed + 4, -1, 1);
    p.fill_uniform(norm_.row_mean, seed + 5, -0.01f, 0.01f);
    p.fill_uniform(norm_.col_mean, seed + 6, -0.01f, 0.01f);
    p.fill_uniform(norm_.row_var, seed + 7, 0.9f, 1.1f);
    p.fill_uniform(norm_.col_var, seed + 8, 0.9f, 1.1f);
  }

  void forward() override {
    const int64_t d = kHidden;
    router_forward(cfg_, x_, rw_, norm_, true, out_, saved_, ws_, exec_);
    gather_weighted_sum(b16(values_), i32(out_.indices), f32(out_.gates), T_,
                        static_cast<int>(cfg_.top_k), d, b16(y_), stream_);
  }

  void backward() override {
    const int64_t d = kHidden;
    const int k = static_cast<int>(cfg_.top_k);
    gather_dot(b16(dy_), b16(values_), i32(out_.indices), T_, k, d, f32(dgates_), stream_);
    schedule_build(cfg_, out_.indices, sched_, ws_, exec_);
    scatter_rows_by_schedule(b16(dy_), f32(out_.gates), i32(sched_.expert_offsets),
                             i32(sched_.pair_order), cfg_.num_experts(), k, d, b16(dvalues_),
                             stream_);
    router_backward(cfg_, x_, rw_, true, saved_, out_, dgates_, dx_, false, rg_, ws_, exec_);
  }

  TensorView output() const override { return y_; }
  TensorView input_grad() const override { return dx_; }
  std::string note() override {
    return "444x444 product keys (library router, batch norm, softmax over K); value gather "
           "CTA per token; dV by the library schedule (sorted pairs)";
  }

  std::string check(bool& failed) override {
    const int64_t d = kHidden, K = cfg_.top_k;
    p_.synchronize();
    std::vector<double> got, want, got_dg, want_dg;
    double gate_sum_err = 0.0;
    for (const int64_t t : {int64_t{0}, T_ - 1}) {
      const auto idx = download(p_, out_.indices, t * K, K);
      const auto gate = download(p_, out_.gates, t * K, K);
      const auto dy = download(p_, dy_, t * d, d);
      const auto dg = download(p_, dgates_, t * K, K);
      std::vector<double> y(static_cast<size_t>(d), 0.0);
      double gs = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const auto v = download(p_, values_, static_cast<int64_t>(idx[k]) * d, d);
        double dot = 0.0;
        for (int64_t c = 0; c < d; ++c) {
          y[c] += gate[k] * v[c];
          dot += dy[c] * v[c];
        }
        gs += gate[k];
        got_dg.push_back(dg[k]);
        want_dg.push_back(dot);
      }
      gate_sum_err = std::max(gate_sum_err, std::fabs(gs - 1.0));
      const auto dev = download(p_, y_, t * d, d);
      got.insert(got.end(), dev.begin(), dev.end());
      want.insert(want.end(), y.begin(), y.end());
    }
    // dV of the first value token 0 chose: every pair that chose it, from the whole routing.
    const auto all_idx = download(p_, out_.indices, 0, T_ * K);
    const auto all_gate = download(p_, out_.gates, 0, T_ * K);
    const int64_t e0 = static_cast<int64_t>(all_idx[0]);
    std::vector<double> dv(static_cast<size_t>(d), 0.0);
    for (int64_t q = 0; q < T_ * K; ++q) {
      if (static_cast<int64_t>(all_idx[q]) != e0) continue;
      const auto dy = download(p_, dy_, (q / K) * d, d);
      for (int64_t c = 0; c < d; ++c) dv[c] += all_gate[q] * dy[c];
    }
    const auto dev_dv = download(p_, dvalues_, e0 * d, d);
    char buf[96];
    std::snprintf(buf, sizeof buf, "gates sum to 1 within %.1e; ", gate_sum_err);
    if (gate_sum_err > 1e-3) failed = true;
    return buf +
           format_error("value gather of 2 tokens vs host", relative_l2(got, want), 2e-2, failed) +
           "; " + format_error("dgates", relative_l2(got_dg, want_dg), 2e-2, failed) + "; " +
           format_error("dV of one value", relative_l2(dev_dv, dv), 2e-2, failed);
  }

 private:
  static float* f32(const TensorView& t) { return static_cast<float*>(t.data); }
  static int32_t* i32(const TensorView& t) { return static_cast<int32_t*>(t.data); }
  static bf16* b16(const TensorView& t) { return static_cast<bf16*>(t.data); }

  Platform& p_;
  Store st_;
  int64_t T_;
  LayerConfig cfg_;
  Exec exec_;
  cudaStream_t stream_ = nullptr;
  TensorView x_, dy_, y_, dx_, values_, dvalues_, dgates_;
  RouterWeights rw_, rg_;
  RouterNormState norm_;
  RouterOutputs out_;
  RouterSaved saved_;
  Schedule sched_;
  Buffer ws_;
};

// --- PEER and OmniMoE: the library's layer (PEER: no shared MLP, gather path forced) ----------

class LayerMethod : public Method {
 public:
  LayerMethod(Platform& p, const BenchConfig& c, uint64_t seed, std::string label)
      : setup_(p, c, 1, seed), label_(std::move(label)) {
    setup_.prepare();
    const LayerConfig& l = c.layer;
    param_bytes =
        static_cast<size_t>((l.grid_rows + l.grid_cols) * l.hidden +
                            2 * l.num_experts() * l.hidden + 3 * l.intermediate * l.hidden) *
        dtype_size(c.dtype);
    path_ = experts_execution(l, c.tokens, c.dtype, setup_.exec);
  }
  void forward() override {
    InputSet& s = setup_.sets[0];
    SharedBuffers& b = setup_.shared;
    layer_forward(setup_.config.layer, s.x, s.weights, s.norm, true, b.y, s.saved, b.workspace,
                  setup_.exec);
  }
  void backward() override {
    InputSet& s = setup_.sets[0];
    SharedBuffers& b = setup_.shared;
    layer_backward(setup_.config.layer, s.x, s.weights, true, s.saved, s.dy, b.dx, b.grads,
                   b.workspace, setup_.exec);
  }
  TensorView output() const override { return setup_.shared.y; }
  TensorView input_grad() const override { return setup_.shared.dx; }
  std::string note() override {
    std::string n = label_ + "; experts path " + path_;
    for (const std::string& s : setup_.notes) n += "; " + s;
    return n;
  }

 private:
  LayerSetup setup_;
  std::string label_;
  std::string path_;
};

BenchConfig layer_config(int64_t tokens, int64_t k, int64_t inter) {
  BenchConfig c;
  c.name = "compare";
  c.tokens = tokens;
  c.dtype = DType::bf16;
  c.layer.hidden = kHidden;
  c.layer.grid_rows = c.layer.grid_cols = 320;
  c.layer.top_k = k;
  c.layer.intermediate = inter;
  c.layer.router_norm = RouterNorm::batch;
  c.layer.gating = Gating::softmax;
  c.layer.validate();
  return c;
}

}  // namespace

int64_t active_params(const std::string& m, int64_t budget, int64_t d) {
  if (m == "dense") return 3 * budget * d;
  if (m == "gshard") return 3 * 512 * d * budget;
  if (m == "deepseekmoe") return 3 * 256 * d * budget + 3 * 1024 * d;
  if (m == "pkm") return budget * d;
  if (m == "peer") return 2 * budget * d;
  if (m == "omnimoe") return 2 * budget * d + 3 * 1024 * d;
  return 0;
}

std::unique_ptr<Method> make_method(Platform& p, const MethodSpec& s, uint64_t seed) {
  const int k = static_cast<int>(s.budget);
  if (s.method == "dense") return std::make_unique<DenseMethod>(p, s.tokens, s.budget, seed);
  if (s.method == "gshard")
    return std::make_unique<CoarseMoeMethod>(p, s.tokens, 128, 512, k, 0, true, seed);
  if (s.method == "deepseekmoe")
    return std::make_unique<CoarseMoeMethod>(p, s.tokens, 256, 256, k, 1024, false, seed);
  if (s.method == "pkm") return std::make_unique<PkmMethod>(p, s.tokens, s.budget, seed);
  if (s.method == "peer")
    return std::make_unique<LayerMethod>(p, layer_config(s.tokens, s.budget, 0), seed,
                                         "library layer, no shared MLP, 320x320 product keys");
  if (s.method == "omnimoe")
    return std::make_unique<LayerMethod>(p, layer_config(s.tokens, s.budget, 1024), seed,
                                         "library layer_forward/layer_backward");
  throw Error("compare: unknown method " + s.method);
}

}  // namespace omnimoe::tool::compare
