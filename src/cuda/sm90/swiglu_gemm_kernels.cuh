// The fused SwiGLU GEMMs of swiglu_gemm.cu as templates over a tile configuration: each
// configuration is instantiated in its own translation unit (swiglu_gemm_<config>.cu), so that
// they compile in parallel. See swiglu_gemm.cu for what the epilogues compute.
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/numeric_types.h>

#include "cuda/cuda_common.cuh"
#include "cuda/swiglu_math.cuh"
#include "cuda/sm90/swiglu_gemm_configs.h"

namespace omnimoe::cuda {
namespace {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

// Elementwise functors over CUTLASS fragments (Array<float, N>), as Sm90Compute calls them.
#define OMNIMOE_ELEMENTWISE_FN(Name, params, expr)                  \
  template <class Frag>                                            \
  struct Name {                                                    \
    CUTLASS_DEVICE Frag operator() params const {                  \
      Frag r;                                                      \
      CUTLASS_PRAGMA_UNROLL                                        \
      for (int i = 0; i < Frag::kElements; ++i) r[i] = expr;       \
      return r;                                                    \
    }                                                              \
  };
OMNIMOE_ELEMENTWISE_FN(SigmoidFn, (Frag const& g), swiglu::sigmoid(g[i]))
OMNIMOE_ELEMENTWISE_FN(SwigluForwardFn, (Frag const& g, Frag const& s, Frag const& u),
                       swiglu::forward(g[i], s[i], u[i]))
OMNIMOE_ELEMENTWISE_FN(SwigluGradGateFn,
                       (Frag const& dh, Frag const& g, Frag const& s, Frag const& u),
                       swiglu::grad_gate(g[i], s[i], u[i], dh[i]))
OMNIMOE_ELEMENTWISE_FN(SwigluGradUpFn, (Frag const& dh, Frag const& g, Frag const& s),
                       swiglu::grad_up(g[i], s[i], dh[i]))
// Rounds to the node's output type (the identity in float).
OMNIMOE_ELEMENTWISE_FN(PassFn, (Frag const& v), v[i])
// (stored, stored, result) -> result: the output node, after the stores it depends on.
OMNIMOE_ELEMENTWISE_FN(LastFn, (Frag const&, Frag const&, Frag const& v), v[i])
#undef OMNIMOE_ELEMENTWISE_FN

// The configurations of swiglu_gemm_configs.h.
struct pingpong_128x128 {
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_2, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
};
struct coop_128x256 {
  using TileShape = Shape<_128, _256, _64>;
  using ClusterShape = Shape<_2, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
};
struct coop_256x128 {
  using TileShape = Shape<_256, _128, _64>;
  using ClusterShape = Shape<_1, _2, _1>;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
};

// Row-major [rows, cols] with any row stride, as CUTLASS's (M, N, L) or (N, K, L) strides.
using RowMajorStride = cutlass::gemm::TagToStrideC_t<cutlass::layout::RowMajor>;

// One fused GEMM type: D [M, N] = epilogue(A [M, K] B [K, N]), A row-major, B row-major
// ([K, N], N contiguous) or column-major ([N, K], K contiguous).
template <class Config, class Element, class LayoutB, bool Backward>
struct FusedGemm {
  using ElementAcc = float;
  using TileShape = typename Config::TileShape;
  using ClusterShape = typename Config::ClusterShape;
  using MainloopSchedule = typename Config::MainloopSchedule;
  using EpilogueSchedule = typename Config::EpilogueSchedule;
  using EpilogueTile = cutlass::epilogue::collective::EpilogueTileAuto;
  static constexpr int kAlign = 16 / sizeof(Element);
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  using EpiDesc = cutlass::epilogue::collective::detail::EpilogueDescriptor<
      TileShape, EpilogueTile, void, Element, EpilogueSchedule>;
  using LoadDesc = cutlass::epilogue::collective::detail::AuxLoadDescriptor<
      EpiDesc, cutlass::layout::RowMajor, Element>;
  using StoreDesc = cutlass::epilogue::collective::detail::AuxStoreDescriptor<
      EpiDesc, cutlass::layout::RowMajor, Element>;
  using AuxLoad = fusion::Sm90AuxLoad<LoadDesc::Stages, typename EpiDesc::EpilogueTile, Element,
                                      RowMajorStride, typename LoadDesc::SmemLayoutAtom,
                                      typename LoadDesc::CopyOpS2R, kAlign, false>;
  using AuxStore = fusion::Sm90AuxStore<StoreDesc::Stages, typename EpiDesc::EpilogueTile, Element,
                                        kRound, RowMajorStride, typename StoreDesc::SmemLayoutAtom,
                                        typename StoreDesc::CopyOpR2S, kAlign, false>;
  template <template <class> class Fn, class Out = float>
  using Compute = fusion::Sm90Compute<Fn, Out, float, kRound>;

  // Nodes in topological order; each int_sequence lists a node's inputs.
  //   forward:  0 acc | 1 u = round(acc) | 2 store u | 3 load g | 4 s = sigmoid(g) |
  //             5 D = h = silu(g) u
  using ForwardEpilogue = fusion::Sm90TopologicalVisitor<
      float,
      cute::tuple<cute::seq<>, cute::seq<0>, cute::seq<1>, cute::seq<>, cute::seq<3>,
                  cute::seq<3, 4, 1>>,
      fusion::Sm90AccFetch, Compute<PassFn, Element>, AuxStore, AuxLoad, Compute<SigmoidFn>,
      Compute<SwigluForwardFn, Element>>;
  //   backward: 0 acc | 1 dh = round(acc) | 2 load g | 3 load u | 4 s = sigmoid(g) |
  //             5 d_gate | 6 store d_gate | 7 h | 8 store h | 9 d_up | 10 D = d_up
  using BackwardEpilogue = fusion::Sm90TopologicalVisitor<
      float,
      cute::tuple<cute::seq<>, cute::seq<0>, cute::seq<>, cute::seq<>, cute::seq<2>,
                  cute::seq<1, 2, 4, 3>, cute::seq<5>, cute::seq<2, 4, 3>, cute::seq<7>,
                  cute::seq<1, 2, 4>, cute::seq<6, 8, 9>>,
      fusion::Sm90AccFetch, Compute<PassFn, Element>, AuxLoad, AuxLoad, Compute<SigmoidFn>,
      Compute<SwigluGradGateFn>, AuxStore, Compute<SwigluForwardFn>, AuxStore,
      Compute<SwigluGradUpFn>, Compute<LastFn, Element>>;
  using Epilogue = std::conditional_t<Backward, BackwardEpilogue, ForwardEpilogue>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape, EpilogueTile,
      ElementAcc, float, void, cutlass::layout::RowMajor, kAlign, Element,
      cutlass::layout::RowMajor, kAlign, EpilogueSchedule, Epilogue>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor,
      kAlign, Element, LayoutB, kAlign, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideD = typename Kernel::StrideD;
};

template <class Element>
Element* ptr(const TensorView& t) {
  return static_cast<Element*>(t.data);
}

RowMajorStride row_major(const TensorView& t) { return RowMajorStride{t.strides[0], _1{}, 0}; }

#define OMNIMOE_CUTLASS_CHECK(call, what)                                                 \
  do {                                                                                    \
    const cutlass::Status omnimoe_status_ = (call);                                       \
    OMNIMOE_CHECK(omnimoe_status_ == cutlass::Status::kSuccess, what, ": CUTLASS says ", \
                  cutlassGetStatusString(omnimoe_status_));                               \
  } while (0)

template <class G>
void launch(typename G::Gemm::Arguments& args, Buffer workspace, const Exec& exec,
            const char* what) {
  typename G::Gemm gemm;
  OMNIMOE_CUTLASS_CHECK(gemm.can_implement(args), what);
  const size_t need = G::Gemm::get_workspace_size(args);
  OMNIMOE_CHECK(need <= workspace.bytes, what, ": CUTLASS workspace needs ", need,
                " bytes, the caller gave ", workspace.bytes);
  OMNIMOE_CUTLASS_CHECK(gemm.initialize(args, workspace.data, stream_of(exec)), what);
  OMNIMOE_CUTLASS_CHECK(gemm.run(stream_of(exec)), what);
  OMNIMOE_CUDA_CHECK_LAUNCH(what);
}

template <class Config, class Element>
void up_impl(const TensorView& x, const TensorView& w_up, const TensorView& gate_pre,
             const TensorView& up_pre, const TensorView& h, Buffer workspace, int sm_count,
             const Exec& exec) {
  using G = FusedGemm<Config, Element, cutlass::layout::ColumnMajor, false>;
  const int m = static_cast<int>(x.shape[0]), n = static_cast<int>(w_up.shape[0]),
            k = static_cast<int>(x.shape[1]);
  typename G::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {m, n, k, 1},
      {ptr<Element>(x), typename G::StrideA{x.strides[0], _1{}, 0}, ptr<Element>(w_up),
       typename G::StrideB{w_up.strides[0], _1{}, 0}},
      {{}, nullptr, typename G::StrideD{}, ptr<Element>(h), row_major(h)}};
  args.epilogue.thread = {
      {},                                         // 0 acc
      {},                                         // 1 round
      {ptr<Element>(up_pre), row_major(up_pre)},  // 2 store u
      {ptr<Element>(gate_pre), Element(0), row_major(gate_pre)},  // 3 load g
      {},                                                         // 4 s
      {},                                                         // 5 h
  };
  args.hw_info.device_id = exec.device.index;
  args.hw_info.sm_count = sm_count;
  launch<G>(args, workspace, exec, "swiglu_up_gemm");
}

template <class Config, class Element>
void down_grad_impl(const TensorView& dy, const TensorView& w_down, const TensorView& gate_pre,
                    const TensorView& up_pre, const TensorView& d_gate, const TensorView& d_up,
                    const TensorView& h, Buffer workspace, int sm_count, const Exec& exec) {
  using G = FusedGemm<Config, Element, cutlass::layout::RowMajor, true>;
  const int m = static_cast<int>(dy.shape[0]), n = static_cast<int>(w_down.shape[1]),
            k = static_cast<int>(dy.shape[1]);
  typename G::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {m, n, k, 1},
      {ptr<Element>(dy), typename G::StrideA{dy.strides[0], _1{}, 0}, ptr<Element>(w_down),
       typename G::StrideB{_1{}, w_down.strides[0], 0}},
      {{}, nullptr, typename G::StrideD{}, ptr<Element>(d_up), row_major(d_up)}};
  args.epilogue.thread = {
      {},                                                         // 0 acc
      {},                                                         // 1 round
      {ptr<Element>(gate_pre), Element(0), row_major(gate_pre)},  // 2 load g
      {ptr<Element>(up_pre), Element(0), row_major(up_pre)},      // 3 load u
      {},                                                         // 4 s
      {},                                                         // 5 d_gate
      {ptr<Element>(d_gate), row_major(d_gate)},                  // 6 store d_gate
      {},                                                         // 7 h
      {ptr<Element>(h), row_major(h)},                            // 8 store h
      {},                                                         // 9 d_up
      {},                                                         // 10 D
  };
  args.hw_info.device_id = exec.device.index;
  args.hw_info.sm_count = sm_count;
  launch<G>(args, workspace, exec, "swiglu_down_grad_gemm");
}

}  // namespace
}  // namespace omnimoe::cuda

// One configuration's two products for bf16 and f16 (swiglu_gemm_<config>.cu defines them).
#define OMNIMOE_SWIGLU_GEMM_CONFIG(Config)                                                     \
  void swiglu_up_gemm_##Config(const TensorView& x, const TensorView& w_up,                   \
                               const TensorView& gate_pre, const TensorView& up_pre,          \
                               const TensorView& h, Buffer workspace, int sm_count,           \
                               const Exec& exec) {                                            \
    if (x.dtype == DType::bf16) {                                                             \
      up_impl<Config, cutlass::bfloat16_t>(x, w_up, gate_pre, up_pre, h, workspace, sm_count, \
                                           exec);                                             \
    } else {                                                                                  \
      up_impl<Config, cutlass::half_t>(x, w_up, gate_pre, up_pre, h, workspace, sm_count,     \
                                       exec);                                                 \
    }                                                                                         \
  }                                                                                           \
  void swiglu_down_grad_gemm_##Config(const TensorView& dy, const TensorView& w_down,         \
                                      const TensorView& gate_pre, const TensorView& up_pre,   \
                                      const TensorView& d_gate, const TensorView& d_up,       \
                                      const TensorView& h, Buffer workspace, int sm_count,    \
                                      const Exec& exec) {                                     \
    if (dy.dtype == DType::bf16) {                                                            \
      down_grad_impl<Config, cutlass::bfloat16_t>(dy, w_down, gate_pre, up_pre, d_gate, d_up, \
                                                  h, workspace, sm_count, exec);              \
    } else {                                                                                  \
      down_grad_impl<Config, cutlass::half_t>(dy, w_down, gate_pre, up_pre, d_gate, d_up, h,  \
                                              workspace, sm_count, exec);                     \
    }                                                                                         \
  }
