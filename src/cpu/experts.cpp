// CPU atomic experts: token-centric forward, and a backward whose per-expert weight gradients
// walk the schedule (expert-centric), so each thread owns whole rows: no races, and the sums run
// in the schedule's fixed token order whatever the thread count.
#include <algorithm>
#include <vector>

#include "backend/backend.h"
#include "cpu/cpu_common.h"

namespace omnimoe::cpu {

namespace {

template <typename Acc, typename T>
Acc dot(const T* a, const T* b, int64_t n) {
  Acc s = 0;
  for (int64_t j = 0; j < n; ++j) s += Acc(to_float(a[j])) * Acc(to_float(b[j]));
  return s;
}

template <typename T, typename Acc>
void store_row(T* out, const Acc* v, int64_t n, bool accumulate) {
  for (int64_t j = 0; j < n; ++j) {
    const Acc s = accumulate ? Acc(to_float(out[j])) + v[j] : v[j];
    out[j] = from_double<T>(static_cast<double>(s));
  }
}

template <typename T>
void forward_impl(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& w,
                  const TensorView& indices, const TensorView& gates, const TensorView& y,
                  bool accumulate, const TensorView& preact, const Exec& exec) {
  using Acc = acc_t<T>;
  const int64_t tokens = x.shape[0], d = cfg.hidden, K = cfg.top_k;
  const int32_t* idx = static_cast<const int32_t*>(indices.data);
  const float* g = static_cast<const float*>(gates.data);
  float* pre = static_cast<float*>(preact.data);
  check_expert_ids("experts_forward", "indices", idx, tokens * K, K, cfg.num_experts());
#pragma omp parallel num_threads(thread_count(exec))
  {
    std::vector<Acc> out(static_cast<size_t>(d));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      const T* xt = row_ptr<T>(x, t);
      std::fill(out.begin(), out.end(), Acc(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t p = t * K + k;
        const int64_t e = idx[p];
        const Acc a = dot<Acc>(xt, row_ptr<T>(w.up, e), d);
        pre[p] = static_cast<float>(a);
        const Acc coef = Acc(g[p]) * activate<Acc>(cfg.act, a);
        const T* ve = row_ptr<T>(w.down, e);
        for (int64_t j = 0; j < d; ++j) out[j] += coef * Acc(to_float(ve[j]));
      }
      store_row(row_ptr<T>(y, t), out.data(), d, accumulate);
    }
  }
}

template <typename T>
void backward_impl(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& w,
                   const TensorView& indices, const TensorView& gates, const TensorView& preact,
                   const Schedule& schedule, const TensorView& dy, const TensorView& dx,
                   bool accumulate_dx, const ExpertWeights& grads, const TensorView& dgates,
                   const Exec& exec) {
  using Acc = acc_t<T>;
  const int64_t tokens = x.shape[0], d = cfg.hidden, K = cfg.top_k, N = cfg.num_experts();
  const int threads = thread_count(exec);
  const int64_t pairs = tokens * K;
  const int32_t* idx = static_cast<const int32_t*>(indices.data);
  const float* g = static_cast<const float*>(gates.data);
  const float* pre = static_cast<const float*>(preact.data);
  float* dg = static_cast<float*>(dgates.data);
  check_expert_ids("experts_backward", "indices", idx, pairs, K, N);

  // Per pair: d loss / d preact, and the coefficient g * act(a) of dy in dV.
  std::vector<Acc> dpre(static_cast<size_t>(pairs)), coef(static_cast<size_t>(pairs));

  // Token-centric: dgates, dx, and the per-pair factors.
#pragma omp parallel num_threads(threads)
  {
    std::vector<Acc> acc(static_cast<size_t>(d));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      const T* xt = row_ptr<T>(x, t);
      const T* dyt = row_ptr<T>(dy, t);
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t p = t * K + k;
        const T* we = row_ptr<T>(w.up, idx[p]);
        // f64 storage recomputes the pre-activation in double: the saved one is only f32, and
        // the f64 path is the one finite differences check tightly.
        const Acc a = std::is_same_v<T, double> ? dot<Acc>(xt, we, d) : Acc(pre[p]);
        const Acc dyv = dot<Acc>(dyt, row_ptr<T>(w.down, idx[p]), d);
        const Acc h = activate<Acc>(cfg.act, a);
        dg[p] = static_cast<float>(h * dyv);
        dpre[p] = Acc(g[p]) * dyv * activate_grad<Acc>(cfg.act, a);
        coef[p] = Acc(g[p]) * h;
        for (int64_t j = 0; j < d; ++j) acc[j] += dpre[p] * Acc(to_float(we[j]));
      }
      store_row(row_ptr<T>(dx, t), acc.data(), d, accumulate_dx);
    }
  }

  // Expert-centric: each expert's rows of dW and dV from the pairs the schedule groups under it
  // (tokens ascending). Experts no token chose get zero rows.
  const int32_t* offsets = static_cast<const int32_t*>(schedule.expert_offsets.data);
  const int32_t* order = static_cast<const int32_t*>(schedule.pair_order.data);
#pragma omp parallel num_threads(threads)
  {
    std::vector<Acc> du(static_cast<size_t>(d)), dv(static_cast<size_t>(d));
#pragma omp for schedule(dynamic, 16)
    for (int64_t e = 0; e < N; ++e) {
      std::fill(du.begin(), du.end(), Acc(0));
      std::fill(dv.begin(), dv.end(), Acc(0));
      const int64_t begin = tokens > 0 ? offsets[e] : 0;
      const int64_t end = tokens > 0 ? offsets[e + 1] : 0;
      for (int64_t q = begin; q < end; ++q) {
        const int64_t p = order[q];
        const int64_t t = p / K;
        const T* xt = row_ptr<T>(x, t);
        const T* dyt = row_ptr<T>(dy, t);
        for (int64_t j = 0; j < d; ++j) {
          du[j] += dpre[p] * Acc(to_float(xt[j]));
          dv[j] += coef[p] * Acc(to_float(dyt[j]));
        }
      }
      store_row(row_ptr<T>(grads.up, e), du.data(), d, false);
      store_row(row_ptr<T>(grads.down, e), dv.data(), d, false);
    }
  }
}

}  // namespace

const char* experts_execution(const LayerConfig&, int64_t, DType) { return "cpu"; }

size_t experts_forward_workspace_bytes(const LayerConfig&, int64_t, DType) { return 0; }

void experts_forward(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& weights,
                     const TensorView& indices, const TensorView& gates, const TensorView& y,
                     bool accumulate, const TensorView& preact, Buffer workspace,
                     const Exec& exec) {
  dispatch_storage(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    forward_impl<T>(cfg, x, weights, indices, gates, y, accumulate, preact, exec);
  });
}

size_t experts_backward_workspace_bytes(const LayerConfig&, int64_t, DType) { return 0; }
bool experts_backward_reads_schedule(const LayerConfig&, int64_t, DType) { return true; }

void experts_backward(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& weights,
                      const TensorView& indices, const TensorView& gates, const TensorView& preact,
                      const Schedule& schedule, const TensorView& dy, const TensorView& dx,
                      bool accumulate_dx, const ExpertWeights& grads, const TensorView& dgates,
                      Buffer workspace, const Exec& exec) {
  dispatch_storage(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    backward_impl<T>(cfg, x, weights, indices, gates, preact, schedule, dy, dx, accumulate_dx,
                     grads, dgates, exec);
  });
}

}  // namespace omnimoe::cpu
