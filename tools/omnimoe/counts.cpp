#include "counts.h"

namespace omnimoe::tool {

LayerWork count_work(const BenchConfig& c, int64_t distinct_experts) {
  const LayerConfig& l = c.layer;
  const double T = static_cast<double>(c.tokens), d = static_cast<double>(l.hidden);
  const double K = static_cast<double>(l.top_k), N = static_cast<double>(l.num_experts());
  const double R = static_cast<double>(l.grid_rows + l.grid_cols);
  const double I = static_cast<double>(l.intermediate);
  const double P = T * K, D = static_cast<double>(distinct_experts);
  const double s = static_cast<double>(dtype_size(c.dtype));
  const bool mlp = l.intermediate > 0;
  const double y_passes = mlp ? 2.0 : 1.0;  // the experts add into y (read + write) after the MLP

  LayerWork w;
  // Router: logits [T, N_r + N_c] (saved in f32), then indices, scores, gates (4 bytes each).
  w.router_forward = {2 * T * d * R, s * (T * d + R * d) + 4 * T * R + 12 * P};
  // The selection alone: the f32 log-probabilities [T, R] read, indices and scores written.
  w.router_select = {0.0, 4 * T * R + 8 * P};
  // Counting sort of the T*K indices by expert: read indices, write pair order and N+1 offsets.
  w.schedule = {0.0, 4 * P + 4 * P + 4 * (N + 1)};
  // Experts: a dot product and an axpy per pair; each chosen expert's W and V rows read once;
  // x read, y written (read too when it accumulates); indices, gates read, preact written.
  w.experts_forward = {4 * P * d, s * (2 * D * d + T * d + y_passes * T * d) + 12 * P};
  // SwiGLU: three [T, d] x [d, I] products; weights, x, y, and the two saved projections.
  w.mlp_forward = mlp ? Work{6 * T * d * I, s * (3 * I * d + 2 * T * d + 2 * T * I)} : Work{};

  // Router backward: dW_r, dW_c (2 T d R) and dx (2 T d R); reads x, W, the saved logits,
  // indices, gates, dgates; writes the weight gradients; dx is read and written (it adds).
  w.router_backward = {4 * T * d * R, s * (T * d + 2 * R * d + 2 * T * d) + 4 * T * R + 12 * P};
  // Experts backward: about twice the forward; x, dy, the chosen W and V rows read; dx written
  // (and read when it adds); the whole of dW and dV written (rows no token chose are zero);
  // indices, gates, preact, pair order read, dgates written.
  w.experts_backward = {
      8 * P * d, s * (2 * T * d + y_passes * T * d + 2 * D * d + 2 * N * d) + 20 * P + 4 * (N + 1)};
  // SwiGLU backward: six products (dx through W_gate and W_up, dh through W_down, three weight
  // gradients): weights read, gradients written, x, dy, dx, the saved projections.
  w.mlp_backward = mlp ? Work{12 * T * d * I, s * (6 * I * d + 3 * T * d + 2 * T * I)} : Work{};

  // The layer builds the schedule in backward, where the expert sums read it.
  w.layer_forward = w.router_forward + w.experts_forward + w.mlp_forward;
  w.layer_forward_backward = w.layer_forward + w.schedule + w.router_backward +
                             w.experts_backward + w.mlp_backward;

  const Derived der = derive(c);
  const double Id = static_cast<double>(der.dense_intermediate);
  // Counted as the shared MLP's rows are, with I' for I.
  w.dense_forward = {6 * T * d * Id, s * (3 * Id * d + 2 * T * d + 2 * T * Id)};
  w.dense_forward_backward = {18 * T * d * Id, s * (9 * Id * d + 5 * T * d + 4 * T * Id)};
  return w;
}

}  // namespace omnimoe::tool
