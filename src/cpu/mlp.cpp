// CPU shared SwiGLU MLP: y = W_down (silu(W_gate x) * (W_up x)), as plain GEMMs in the
// accumulation type, with host temporaries (the CPU backend needs no workspace).
#include <vector>

#include "backend/backend.h"
#include "cpu/cpu_common.h"

namespace omnimoe::cpu {

namespace {

template <typename T>
void forward_impl(const LayerConfig& cfg, const TensorView& x, const MlpWeights& w,
                  const TensorView& y, bool accumulate, const MlpSaved& saved, const Exec& exec) {
  using Acc = acc_t<T>;
  const int threads = thread_count(exec);
  const int64_t tokens = x.shape[0], d = cfg.hidden, I = cfg.intermediate;
  const T* xp = static_cast<const T*>(x.data);
  const int64_t xs = x.strides[0];

  // gate_pre = x W_gate^T, up_pre = x W_up^T: [T, I], kept unrounded for the product below.
  std::vector<Acc> gate(static_cast<size_t>(tokens * I)), up(static_cast<size_t>(tokens * I));
  gemm<Acc>(tokens, I, d, xp, xs, 1, static_cast<const T*>(w.gate.data), 1, w.gate.strides[0],
            gate.data(), I, false, threads);
  gemm<Acc>(tokens, I, d, xp, xs, 1, static_cast<const T*>(w.up.data), 1, w.up.strides[0],
            up.data(), I, false, threads);

  T* gate_out = static_cast<T*>(saved.gate_pre.data);
  T* up_out = static_cast<T*>(saved.up_pre.data);
  std::vector<Acc>& h = gate;  // silu(gate) * up, in place once gate_pre is stored
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < tokens * I; ++i) {
    gate_out[i] = from_double<T>(static_cast<double>(gate[i]));
    up_out[i] = from_double<T>(static_cast<double>(up[i]));
    h[i] = activate<Acc>(Activation::silu, gate[i]) * up[i];
  }

  // y = h W_down^T, W_down [d, I].
  gemm<Acc>(tokens, d, I, h.data(), I, 1, static_cast<const T*>(w.down.data), 1, w.down.strides[0],
            static_cast<T*>(y.data), y.strides[0], accumulate, threads);
}

template <typename T>
void backward_impl(const LayerConfig& cfg, const TensorView& x, const MlpWeights& w,
                   const MlpSaved& saved, const TensorView& dy, const TensorView& dx,
                   bool accumulate_dx, const MlpWeights& grads, const Exec& exec) {
  using Acc = acc_t<T>;
  const int threads = thread_count(exec);
  const int64_t tokens = x.shape[0], d = cfg.hidden, I = cfg.intermediate;
  const T* xp = static_cast<const T*>(x.data);
  const T* dyp = static_cast<const T*>(dy.data);
  const int64_t xs = x.strides[0], dys = dy.strides[0];
  const T* gate_pre = static_cast<const T*>(saved.gate_pre.data);
  const T* up_pre = static_cast<const T*>(saved.up_pre.data);

  // dh = dy W_down: [T, I].
  std::vector<Acc> dh(static_cast<size_t>(tokens * I));
  gemm<Acc>(tokens, I, d, dyp, dys, 1, static_cast<const T*>(w.down.data), w.down.strides[0], 1,
            dh.data(), I, false, threads);

  // h (for dW_down), then d gate_pre and d up_pre, all [T, I].
  std::vector<Acc> h(static_cast<size_t>(tokens * I)), dgate(h.size()), dup(h.size());
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < tokens * I; ++i) {
    const Acc gp = Acc(to_float(gate_pre[i])), up = Acc(to_float(up_pre[i]));
    const Acc s = activate<Acc>(Activation::silu, gp);
    h[i] = s * up;
    dgate[i] = dh[i] * up * activate_grad<Acc>(Activation::silu, gp);
    dup[i] = dh[i] * s;
  }

  // dW_down [d, I] = dy^T h; dW_gate, dW_up [I, d] = dgate^T x, dup^T x. With T = 0 these write
  // zeros (an empty sum).
  gemm<Acc>(d, I, tokens, dyp, 1, dys, h.data(), I, 1, static_cast<T*>(grads.down.data),
            grads.down.strides[0], false, threads);
  gemm<Acc>(I, d, tokens, dgate.data(), 1, I, xp, xs, 1, static_cast<T*>(grads.gate.data),
            grads.gate.strides[0], false, threads);
  gemm<Acc>(I, d, tokens, dup.data(), 1, I, xp, xs, 1, static_cast<T*>(grads.up.data),
            grads.up.strides[0], false, threads);

  // dx = dgate W_gate + dup W_up, summed in Acc and rounded to storage once.
  std::vector<Acc> dxs(static_cast<size_t>(tokens * d));
  gemm<Acc>(tokens, d, I, dgate.data(), I, 1, static_cast<const T*>(w.gate.data), w.gate.strides[0],
            1, dxs.data(), d, false, threads);
  gemm<Acc>(tokens, d, I, dup.data(), I, 1, static_cast<const T*>(w.up.data), w.up.strides[0], 1,
            dxs.data(), d, true, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tokens; ++t) {
    T* out = row_ptr<T>(dx, t);
    for (int64_t j = 0; j < d; ++j) {
      const Acc v = accumulate_dx ? Acc(to_float(out[j])) + dxs[t * d + j] : dxs[t * d + j];
      out[j] = from_double<T>(static_cast<double>(v));
    }
  }
}

}  // namespace

size_t mlp_forward_workspace_bytes(const LayerConfig&, int64_t, DType) { return 0; }

void mlp_forward(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                 const TensorView& y, bool accumulate, const MlpSaved& saved, Buffer workspace,
                 const Exec& exec) {
  dispatch_storage(x.dtype, [&](auto tag) {
    forward_impl<decltype(tag)>(cfg, x, weights, y, accumulate, saved, exec);
  });
}

void mlp_forward_joined(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                        const TensorView& y, const TensorView& addend, const MlpSaved& saved,
                        const std::function<void()>& join, Buffer workspace, const Exec& exec) {
  join();
  cpu::mlp_forward(cfg, x, weights, y, /*accumulate=*/false, saved, workspace, exec);
  cpu::tensor_add(y, addend, exec);
}

size_t mlp_backward_workspace_bytes(const LayerConfig&, int64_t, DType) { return 0; }

void mlp_backward(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                  const MlpSaved& saved, const TensorView& dy, const TensorView& dx,
                  bool accumulate_dx, const MlpWeights& grads, Buffer workspace, const Exec& exec) {
  dispatch_storage(x.dtype, [&](auto tag) {
    backward_impl<decltype(tag)>(cfg, x, weights, saved, dy, dx, accumulate_dx, grads, exec);
  });
}

void mlp_backward_joined(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                         const MlpSaved& saved, const TensorView& dy, const TensorView& dx,
                         const TensorView& addend, const MlpWeights& grads,
                         const std::function<void()>& join, Buffer workspace, const Exec& exec) {
  join();
  cpu::mlp_backward(cfg, x, weights, saved, dy, dx, /*accumulate_dx=*/false, grads, workspace,
                    exec);
  if (x.shape[0] > 0) cpu::tensor_add(dx, addend, exec);
}

}  // namespace omnimoe::cpu
