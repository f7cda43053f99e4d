// CPU router: logits, batch norm, log-softmax, exact top-K of the pair sums, gates, and the
// backward through all of it. Plain loops, OpenMP over tokens, host temporaries.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "backend/backend.h"
#include "cpu/cpu_common.h"

namespace omnimoe::cpu {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Selection. For one token, with p_r (N_r) and p_c (N_c):
//
//  1. Keys: a NaN log-prob ranks as -inf; a pair's key is the float sum of the two keys, and
//     the one NaN a sum can make (+inf + -inf) ranks as -inf too. The key is monotone in each
//     argument, so after sorting each axis descending (ties by smaller index) the keys are
//     non-increasing along both sorted axes.
//  2. tau = the K-th largest key: a binary search over the order-preserving uint32 encoding of
//     floats for the largest value with count(key >= value) >= K. count() is a two-pointer walk
//     over the sorted axes: the columns with key >= value form a prefix of every sorted row,
//     and the prefix shrinks as the row rank grows. O(N_r + N_c) per count, 32 counts at most.
//  3. Every pair with key > tau is taken (fewer than K; enumerated row by row up to the same
//     two-pointer boundary). The rest comes from the pairs with key == tau in increasing
//     expert id: per sorted row the tied columns are a contiguous range of sorted ranks, so
//     the rows are visited in increasing row id and whole ranges taken while they fit; only
//     the last range is partially sorted for its smallest column ids.
//  4. The K chosen are sorted by (key desc, id asc); the written score is p_r[i] + p_c[j] in
//     float from the original values (a NaN stays in the score).
// Cost: O((N_r + N_c) log(N_r + N_c) + K log K); the N scores are never formed.
// ---------------------------------------------------------------------------------------------

inline float rank_key(float v) { return std::isnan(v) ? kNegInf : v; }

inline float pair_key(float a, float b) {
  const float s = a + b;
  return std::isnan(s) ? kNegInf : s;
}

// Order-preserving encoding of non-NaN floats (-0 sorts just below +0).
inline uint32_t float_code(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float code_float(uint32_t c) {
  const uint32_t u = (c & 0x80000000u) ? (c & 0x7fffffffu) : ~c;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Candidate {
  float key;
  int32_t id;
};

struct TieRange {
  int32_t row_id;  // original row index
  int64_t begin;   // sorted column ranks [begin, end) tie at tau
  int64_t end;
};

// Per-thread scratch for one token's selection, reused across tokens.
struct SelectScratch {
  std::vector<float> row_key, col_key;  // sorted descending
  std::vector<int32_t> row_id, col_id;  // original index of each sorted rank
  std::vector<Candidate> chosen;
  std::vector<TieRange> ties;
  std::vector<int32_t> tie_cols;
};

void sort_axis(const float* p, int64_t n, std::vector<float>& key, std::vector<int32_t>& id) {
  id.resize(static_cast<size_t>(n));
  key.resize(static_cast<size_t>(n));
  std::iota(id.begin(), id.end(), 0);
  std::sort(id.begin(), id.end(), [p](int32_t a, int32_t b) {
    const float ka = rank_key(p[a]), kb = rank_key(p[b]);
    return ka > kb || (ka == kb && a < b);
  });
  for (int64_t r = 0; r < n; ++r) key[r] = rank_key(p[id[r]]);
}

// Pairs with key >= t, stopping once `enough` are counted.
int64_t count_at_least(const SelectScratch& s, float t, int64_t enough) {
  const int64_t nr = static_cast<int64_t>(s.row_key.size());
  int64_t b = static_cast<int64_t>(s.col_key.size());
  int64_t total = 0;
  for (int64_t a = 0; a < nr; ++a) {
    while (b > 0 && pair_key(s.row_key[a], s.col_key[b - 1]) < t) --b;
    if (b == 0) break;
    total += b;
    if (total >= enough) break;
  }
  return total;
}

void select_token(const float* lr, const float* lc, int64_t nr, int64_t nc, int64_t k,
                  int32_t* out_idx, float* out_score, SelectScratch& s) {
  sort_axis(lr, nr, s.row_key, s.row_id);
  sort_axis(lc, nc, s.col_key, s.col_id);

  // 2. tau, the K-th largest key. count(-inf) = N >= K, so lo always qualifies.
  uint32_t lo = float_code(kNegInf);
  uint32_t hi = float_code(pair_key(s.row_key[0], s.col_key[0]));
  while (lo < hi) {
    const uint32_t mid = lo + static_cast<uint32_t>((static_cast<uint64_t>(hi) - lo + 1) / 2);
    if (count_at_least(s, code_float(mid), k) >= k) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const float tau = code_float(lo);

  // 3. Pairs above tau, and the tied column range of each sorted row.
  s.chosen.clear();
  s.ties.clear();
  int64_t above = nc;     // columns with key > tau in this row
  int64_t at_least = nc;  // columns with key >= tau in this row
  for (int64_t a = 0; a < nr; ++a) {
    const float ra = s.row_key[a];
    while (above > 0 && !(pair_key(ra, s.col_key[above - 1]) > tau)) --above;
    while (at_least > 0 && pair_key(ra, s.col_key[at_least - 1]) < tau) --at_least;
    if (at_least == 0) break;
    const int32_t base = s.row_id[a] * static_cast<int32_t>(nc);
    for (int64_t b = 0; b < above; ++b) {
      s.chosen.push_back({pair_key(ra, s.col_key[b]), base + s.col_id[b]});
    }
    if (at_least > above) s.ties.push_back({s.row_id[a], above, at_least});
  }
  int64_t remaining = k - static_cast<int64_t>(s.chosen.size());
  std::sort(s.ties.begin(), s.ties.end(),
            [](const TieRange& x, const TieRange& y) { return x.row_id < y.row_id; });
  for (const TieRange& r : s.ties) {
    if (remaining == 0) break;
    const int32_t base = r.row_id * static_cast<int32_t>(nc);
    const int64_t len = r.end - r.begin;
    if (len <= remaining) {
      for (int64_t b = r.begin; b < r.end; ++b) s.chosen.push_back({tau, base + s.col_id[b]});
      remaining -= len;
    } else {
      s.tie_cols.assign(s.col_id.begin() + r.begin, s.col_id.begin() + r.end);
      std::nth_element(s.tie_cols.begin(), s.tie_cols.begin() + (remaining - 1), s.tie_cols.end());
      for (int64_t q = 0; q < remaining; ++q) s.chosen.push_back({tau, base + s.tie_cols[q]});
      remaining = 0;
    }
  }

  // 4. Output order: key desc, id asc.
  std::sort(s.chosen.begin(), s.chosen.end(), [](const Candidate& x, const Candidate& y) {
    return x.key > y.key || (x.key == y.key && x.id < y.id);
  });
  for (int64_t q = 0; q < k; ++q) {
    const int32_t e = s.chosen[q].id;
    out_idx[q] = e;
    out_score[q] = lr[e / nc] + lc[e % nc];
  }
}

// Selection for every token; logp rows are dense.
void select_all(int64_t tokens, int64_t nr, int64_t nc, int64_t k, const float* lr, const float* lc,
                int32_t* idx, float* scores, int threads) {
#pragma omp parallel num_threads(threads)
  {
    SelectScratch s;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tokens; ++t) {
      select_token(lr + t * nr, lc + t * nc, nr, nc, k, idx + t * k, scores + t * k, s);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward pieces.
// ---------------------------------------------------------------------------------------------

// Stable log-softmax in float. A NaN propagates to the whole row; an all -inf row gives NaN.
void log_softmax_row(const float* z, int64_t n, float* out) {
  float m = kNegInf;
  for (int64_t i = 0; i < n; ++i) m = z[i] > m ? z[i] : m;
  const float shift = std::isfinite(m) ? m : 0.0f;
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(z[i] - shift);
  const float lse = shift + std::log(sum);
  for (int64_t i = 0; i < n; ++i) out[i] = z[i] - lse;
}

// logits [T, n] (Acc) -> normalised f32 logits into `saved_logits`; updates the running stats
// in training (momentum, unbiased variance, as torch.nn.BatchNorm1d).
template <typename Acc>
void normalise(const LayerConfig& cfg, const std::vector<Acc>& logits, int64_t tokens, int64_t n,
               const TensorView& running_mean, const TensorView& running_var, bool training,
               const TensorView& saved_logits, const TensorView& saved_rstd, int threads) {
  float* z = static_cast<float*>(saved_logits.data);
  if (cfg.router_norm == RouterNorm::none) {
    for (int64_t i = 0; i < tokens * n; ++i) z[i] = static_cast<float>(logits[i]);
    return;
  }
  float* rmean = static_cast<float*>(running_mean.data);
  float* rvar = static_cast<float*>(running_var.data);
  float* rstd_out = static_cast<float*>(saved_rstd.data);
  const double eps = cfg.norm_eps;
  const double momentum = cfg.norm_momentum;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    double mean, var;
    if (training) {
      double sum = 0.0;
      for (int64_t t = 0; t < tokens; ++t) sum += static_cast<double>(logits[t * n + j]);
      mean = sum / static_cast<double>(tokens);
      double sq = 0.0;
      for (int64_t t = 0; t < tokens; ++t) {
        const double c = static_cast<double>(logits[t * n + j]) - mean;
        sq += c * c;
      }
      var = sq / static_cast<double>(tokens);
      const double unbiased = sq / static_cast<double>(tokens - 1);
      rmean[j] = static_cast<float>((1.0 - momentum) * rmean[j] + momentum * mean);
      rvar[j] = static_cast<float>((1.0 - momentum) * rvar[j] + momentum * unbiased);
    } else {
      mean = rmean[j];
      var = rvar[j];
    }
    const double rstd = 1.0 / std::sqrt(var + eps);
    rstd_out[j] = static_cast<float>(rstd);
    for (int64_t t = 0; t < tokens; ++t) {
      z[t * n + j] = static_cast<float>((static_cast<double>(logits[t * n + j]) - mean) * rstd);
    }
  }
}

void gates_row(Gating gating, const float* scores, int64_t k, float* gates) {
  if (gating == Gating::joint) {
    for (int64_t q = 0; q < k; ++q) gates[q] = std::exp(scores[q]);
    return;
  }
  float m = kNegInf;
  for (int64_t q = 0; q < k; ++q) m = scores[q] > m ? scores[q] : m;
  const float shift = std::isfinite(m) ? m : 0.0f;
  float sum = 0.0f;
  for (int64_t q = 0; q < k; ++q) {
    gates[q] = std::exp(scores[q] - shift);
    sum += gates[q];
  }
  const float inv = 1.0f / sum;
  for (int64_t q = 0; q < k; ++q) gates[q] *= inv;
}

template <typename S>
void forward_impl(const LayerConfig& cfg, const TensorView& x, const RouterWeights& w,
                  const RouterNormState& norm, bool training, const RouterOutputs& out,
                  const RouterSaved& saved, int threads) {
  using Acc = acc_t<S>;
  const int64_t tokens = x.shape[0], d = cfg.hidden, nr = cfg.grid_rows, nc = cfg.grid_cols;
  const int64_t k = cfg.top_k;

  // Logits s = x W^T, wide accumulation.
  std::vector<Acc> sr(static_cast<size_t>(tokens * nr)), sc(static_cast<size_t>(tokens * nc));
  gemm<Acc>(tokens, nr, d, row_ptr<S>(x, 0), x.strides[0], 1, row_ptr<S>(w.row, 0), 1,
            w.row.strides[0], sr.data(), nr, false, threads);
  gemm<Acc>(tokens, nc, d, row_ptr<S>(x, 0), x.strides[0], 1, row_ptr<S>(w.col, 0), 1,
            w.col.strides[0], sc.data(), nc, false, threads);

  normalise(cfg, sr, tokens, nr, norm.row_mean, norm.row_var, training, saved.row_logits,
            saved.row_rstd, threads);
  normalise(cfg, sc, tokens, nc, norm.col_mean, norm.col_var, training, saved.col_logits,
            saved.col_rstd, threads);

  std::vector<float> lr(static_cast<size_t>(tokens * nr)), lc(static_cast<size_t>(tokens * nc));
  const float* zr = static_cast<const float*>(saved.row_logits.data);
  const float* zc = static_cast<const float*>(saved.col_logits.data);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tokens; ++t) {
    log_softmax_row(zr + t * nr, nr, lr.data() + t * nr);
    log_softmax_row(zc + t * nc, nc, lc.data() + t * nc);
  }

  int32_t* idx = static_cast<int32_t*>(out.indices.data);
  float* scores = static_cast<float*>(out.scores.data);
  float* gates = static_cast<float*>(out.gates.data);
  select_all(tokens, nr, nc, k, lr.data(), lc.data(), idx, scores, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tokens; ++t) gates_row(cfg.gating, scores + t * k, k, gates + t * k);
}

// ---------------------------------------------------------------------------------------------
// Backward pieces.
// ---------------------------------------------------------------------------------------------

// dz = dlogp - softmax(z) * sum(dlogp), in place; softmax recomputed from the saved logits.
template <typename Acc>
void log_softmax_backward_row(const float* z, int64_t n, Acc* g) {
  Acc m = -std::numeric_limits<Acc>::infinity();
  for (int64_t i = 0; i < n; ++i) m = Acc(z[i]) > m ? Acc(z[i]) : m;
  const Acc shift = std::isfinite(m) ? m : Acc(0);
  Acc sum = 0, gsum = 0;
  for (int64_t i = 0; i < n; ++i) {
    sum += std::exp(Acc(z[i]) - shift);
    gsum += g[i];
  }
  const Acc lse = shift + std::log(sum);
  for (int64_t i = 0; i < n; ++i) g[i] -= std::exp(Acc(z[i]) - lse) * gsum;
}

// dlogits from dz [T, n], in place: batch-norm backward (training: through the batch
// statistics; evaluation: the running statistics are constants), or identity.
template <typename Acc>
void norm_backward(const LayerConfig& cfg, bool training, std::vector<Acc>& g, int64_t tokens,
                   int64_t n, const TensorView& saved_logits, const TensorView& saved_rstd,
                   int threads) {
  if (cfg.router_norm == RouterNorm::none || tokens == 0) return;
  const float* xhat = static_cast<const float*>(saved_logits.data);
  const float* rstd = static_cast<const float*>(saved_rstd.data);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    const Acc r = rstd[j];
    if (!training) {
      for (int64_t t = 0; t < tokens; ++t) g[t * n + j] *= r;
      continue;
    }
    Acc sum = 0, dot = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      sum += g[t * n + j];
      dot += g[t * n + j] * Acc(xhat[t * n + j]);
    }
    const Acc inv_t = Acc(1) / Acc(tokens);
    for (int64_t t = 0; t < tokens; ++t) {
      g[t * n + j] = r * (g[t * n + j] - inv_t * (sum + Acc(xhat[t * n + j]) * dot));
    }
  }
}

template <typename S>
void backward_impl(const LayerConfig& cfg, const TensorView& x, const RouterWeights& w,
                   bool training, const RouterSaved& saved, const RouterOutputs& out,
                   const TensorView& dgates, const TensorView& dx, bool accumulate_dx,
                   const RouterWeights& grads, int threads) {
  using Acc = acc_t<S>;
  const int64_t tokens = x.shape[0], d = cfg.hidden, nr = cfg.grid_rows, nc = cfg.grid_cols;
  const int64_t k = cfg.top_k, n = cfg.num_experts();
  const int32_t* idx = static_cast<const int32_t*>(out.indices.data);
  const float* gates = static_cast<const float*>(out.gates.data);
  const float* dg = static_cast<const float*>(dgates.data);

  check_expert_ids("router_backward", "out.indices", idx, tokens * k, k, n);

  std::vector<Acc> gr(static_cast<size_t>(tokens * nr)), gc(static_cast<size_t>(tokens * nc));
  const float* zr = static_cast<const float*>(saved.row_logits.data);
  const float* zc = static_cast<const float*>(saved.col_logits.data);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tokens; ++t) {
    Acc* r = gr.data() + t * nr;
    Acc* c = gc.data() + t * nc;
    const float* g = gates + t * k;
    const float* dgt = dg + t * k;
    const int32_t* e = idx + t * k;
    // dS: through softmax over the K scores, or through exp for joint gating.
    Acc dot = 0;
    if (cfg.gating == Gating::softmax) {
      for (int64_t q = 0; q < k; ++q) dot += Acc(g[q]) * Acc(dgt[q]);
    }
    for (int64_t q = 0; q < k; ++q) {
      const Acc ds = Acc(g[q]) * (Acc(dgt[q]) - dot);
      r[e[q] / nc] += ds;
      c[e[q] % nc] += ds;
    }
    log_softmax_backward_row(zr + t * nr, nr, r);
    log_softmax_backward_row(zc + t * nc, nc, c);
  }
  norm_backward(cfg, training, gr, tokens, nr, saved.row_logits, saved.row_rstd, threads);
  norm_backward(cfg, training, gc, tokens, nc, saved.col_logits, saved.col_rstd, threads);

  // dW = ds^T x (overwritten; zeros when T = 0).
  gemm<Acc>(nr, d, tokens, gr.data(), 1, nr, row_ptr<S>(x, 0), x.strides[0], 1,
            row_ptr<S>(grads.row, 0), grads.row.strides[0], false, threads);
  gemm<Acc>(nc, d, tokens, gc.data(), 1, nc, row_ptr<S>(x, 0), x.strides[0], 1,
            row_ptr<S>(grads.col, 0), grads.col.strides[0], false, threads);

  // dx (+)= ds_r W_r + ds_c W_c, summed wide and rounded to storage once.
  if (tokens == 0) return;
  std::vector<Acc> acc(static_cast<size_t>(tokens * d));
  gemm<Acc>(tokens, d, nr, gr.data(), nr, 1, row_ptr<S>(w.row, 0), w.row.strides[0], 1, acc.data(),
            d, false, threads);
  gemm<Acc>(tokens, d, nc, gc.data(), nc, 1, row_ptr<S>(w.col, 0), w.col.strides[0], 1, acc.data(),
            d, true, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tokens; ++t) {
    S* out_row = row_ptr<S>(dx, t);
    const Acc* a = acc.data() + t * d;
    for (int64_t j = 0; j < d; ++j) {
      const Acc v = accumulate_dx ? Acc(to_float(out_row[j])) + a[j] : a[j];
      out_row[j] = from_double<S>(static_cast<double>(v));
    }
  }
}

}  // namespace

size_t router_forward_workspace_bytes(const LayerConfig&, int64_t, DType) { return 0; }
size_t router_select_workspace_bytes(const LayerConfig&, int64_t) { return 0; }
size_t router_backward_workspace_bytes(const LayerConfig&, int64_t, DType) { return 0; }

void router_forward(const LayerConfig& cfg, const TensorView& x, const RouterWeights& weights,
                    const RouterNormState& norm, bool training, const RouterOutputs& out,
                    const RouterSaved& saved, Buffer, const Exec& exec) {
  if (x.shape[0] == 0) return;
  dispatch_storage(x.dtype, [&](auto tag) {
    forward_impl<decltype(tag)>(cfg, x, weights, norm, training, out, saved, thread_count(exec));
  });
}

void router_select_topk(const LayerConfig& cfg, const TensorView& row_logp,
                        const TensorView& col_logp, const TensorView& indices,
                        const TensorView& scores, Buffer, const Exec& exec) {
  select_all(row_logp.shape[0], cfg.grid_rows, cfg.grid_cols, cfg.top_k,
             static_cast<const float*>(row_logp.data), static_cast<const float*>(col_logp.data),
             static_cast<int32_t*>(indices.data), static_cast<float*>(scores.data),
             thread_count(exec));
}

void router_backward(const LayerConfig& cfg, const TensorView& x, const RouterWeights& weights,
                     bool training, const RouterSaved& saved, const RouterOutputs& out,
                     const TensorView& dgates, const TensorView& dx, bool accumulate_dx,
                     const RouterWeights& grads, Buffer, const Exec& exec) {
  dispatch_storage(x.dtype, [&](auto tag) {
    backward_impl<decltype(tag)>(cfg, x, weights, training, saved, out, dgates, dx, accumulate_dx,
                                 grads, thread_count(exec));
  });
}

}  // namespace omnimoe::cpu
