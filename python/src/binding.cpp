// Python binding of the omnimoe layer: glue only. It turns DLPack tensors (PyTorch, NumPy, any
// framework) into TensorViews, checks device, dtype and layout with messages that name the
// argument, and makes one call into the C++ API. Outputs, the saved buffer and the workspace
// are allocated by the caller (sizes from the *_bytes queries) and passed in; the CUDA stream
// is the caller's, passed as an integer.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <omnimoe/omnimoe.h>

#include <cstdint>
#include <sstream>
#include <string>

namespace nb = nanobind;
using namespace omnimoe;

namespace {

using Array = nb::ndarray<>;

[[noreturn]] void fail(const std::string& message) { throw Error(message); }

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

const char* dlpack_dtype_name(nb::dlpack::dtype t) {
  using code = nb::dlpack::dtype_code;
  switch (static_cast<code>(t.code)) {
    case code::Float: return t.bits == 16 ? "float16" : t.bits == 32 ? "float32" : "float64";
    case code::Bfloat: return "bfloat16";
    case code::Int: return "int";
    case code::UInt: return "uint";
    case code::Bool: return "bool";
    case code::Complex: return "complex";
    default: return "an unsupported type";
  }
}

bool to_dtype(nb::dlpack::dtype t, DType* out) {
  using code = nb::dlpack::dtype_code;
  if (t.lanes != 1) return false;
  const auto c = static_cast<code>(t.code);
  if (c == code::Float && t.bits == 32) *out = DType::f32;
  else if (c == code::Float && t.bits == 64) *out = DType::f64;
  else if (c == code::Float && t.bits == 16) *out = DType::f16;
  else if (c == code::Bfloat && t.bits == 16) *out = DType::bf16;
  else if (c == code::Int && t.bits == 32) *out = DType::i32;
  else if (c == code::Int && t.bits == 64) *out = DType::i64;
  else if (c == code::UInt && t.bits == 8) *out = DType::u8;
  else return false;
  return true;
}

DType parse_dtype(const std::string& name) {
  if (name == "f32" || name == "float32") return DType::f32;
  if (name == "f64" || name == "float64") return DType::f64;
  if (name == "bf16" || name == "bfloat16") return DType::bf16;
  if (name == "f16" || name == "float16") return DType::f16;
  fail(concat("dtype must be one of float32, float64, bfloat16, float16; got \"", name, "\""));
}

Device parse_device(const std::string& type, int index) {
  if (type == "cpu") return Device::cpu();
  if (type == "cuda") return Device::cuda(index);
  fail(concat("device must be \"cpu\" or \"cuda\", got \"", type, "\""));
}

Device array_device(const char* op, const char* name, const Array& a) {
  switch (a.device_type()) {
    case nb::device::cpu::value: return Device::cpu();
    case nb::device::cuda::value: return Device::cuda(a.device_id());
    default:
      fail(concat(op, ": ", name, " must be on the CPU or a CUDA device, got DLPack device type ",
                  a.device_type()));
  }
}

// A view of `a`, checked for the dtype `want` (`want_what` says why, for the message), the
// device of x and at most kMaxDims dimensions; the launchers check shapes and row strides.
TensorView view_of(const char* op, const char* name, const Array& a, DType want,
                   const char* want_what, Device device) {
  DType dt;
  if (!to_dtype(a.dtype(), &dt)) {
    fail(concat(op, ": ", name, " has unsupported dtype ", dlpack_dtype_name(a.dtype()), " (",
                int(a.dtype().bits), " bits)"));
  }
  if (dt != want) {
    fail(concat(op, ": ", name, " must have dtype ", dtype_name(want), want_what, ", got ",
                dtype_name(dt)));
  }
  const Device dev = array_device(op, name, a);
  if (dev != device) {
    fail(concat(op, ": ", name, " must be on ", device_name(device), " (the device of x), got ",
                device_name(dev)));
  }
  if (a.ndim() > static_cast<size_t>(kMaxDims)) {
    fail(concat(op, ": ", name, " must have at most ", kMaxDims, " dimensions, got ", a.ndim()));
  }
  TensorView v;
  v.data = const_cast<void*>(static_cast<const void*>(a.data()));
  v.dtype = dt;
  v.ndim = static_cast<int>(a.ndim());
  v.device = dev;
  for (int i = 0; i < v.ndim; ++i) {
    v.shape[i] = static_cast<int64_t>(a.shape(i));
    v.strides[i] = a.stride(i);
  }
  return v;
}

TensorView optional_view(const char* op, const char* name, const nb::handle& h, DType want,
                         const char* want_what, Device device) {
  if (h.is_none()) return TensorView{};
  return view_of(op, name, nb::cast<Array>(h), want, want_what, device);
}

// A caller-allocated byte buffer: a dense 1-D uint8 tensor on x's device.
Buffer buffer_of(const char* op, const char* name, const Array& a, Device device) {
  const TensorView v = view_of(op, name, a, DType::u8, "", device);
  if (v.ndim != 1 || (v.shape[0] > 1 && v.strides[0] != 1)) {
    fail(concat(op, ": ", name, " must be a contiguous 1-D uint8 tensor, got ", v.ndim,
                "-D with stride ", v.ndim ? v.strides[0] : 0));
  }
  return Buffer{v.data, static_cast<size_t>(v.shape[0])};
}

Exec exec_for(Device device, uintptr_t stream, int num_threads) {
  Exec e;
  e.device = device;
  e.stream = reinterpret_cast<void*>(stream);
  e.num_threads = num_threads;
  return e;
}

LayerConfig make_config(int64_t hidden, int64_t grid_rows, int64_t grid_cols, int64_t top_k,
                        int64_t intermediate, const std::string& act, const std::string& gating,
                        const std::string& router_norm, float norm_eps, float norm_momentum) {
  LayerConfig c;
  c.hidden = hidden;
  c.grid_rows = grid_rows;
  c.grid_cols = grid_cols;
  c.top_k = top_k;
  c.intermediate = intermediate;
  c.act = parse_activation(act);
  c.gating = parse_gating(gating);
  c.router_norm = parse_router_norm(router_norm);
  c.norm_eps = norm_eps;
  c.norm_momentum = norm_momentum;
  c.validate();
  return c;
}

struct LayerArgs {
  Device device;
  TensorView x;
  LayerWeights weights;
};

// x and the weights; all weights share x's dtype and device. Names are the module's.
LayerArgs layer_args(const char* op, const LayerConfig& cfg, const Array& x,
                     const Array& row, const Array& col, const Array& up, const Array& down,
                     const nb::handle& mlp_gate, const nb::handle& mlp_up,
                     const nb::handle& mlp_down) {
  LayerArgs a;
  a.device = array_device(op, "x", x);
  DType dt;
  if (!to_dtype(x.dtype(), &dt) ||
      !(dt == DType::f32 || dt == DType::f64 || dt == DType::bf16 || dt == DType::f16)) {
    fail(concat(op, ": x must have dtype f32, f64, bf16 or f16, got ",
                to_dtype(x.dtype(), &dt) ? dtype_name(dt) : dlpack_dtype_name(x.dtype())));
  }
  a.x = view_of(op, "x", x, dt, "", a.device);
  const char* same = " (the dtype of x)";
  a.weights.router.row = view_of(op, "router_gate_x.weight", row, dt, same, a.device);
  a.weights.router.col = view_of(op, "router_gate_y.weight", col, dt, same, a.device);
  a.weights.experts.up = view_of(op, "up_embed.weight", up, dt, same, a.device);
  a.weights.experts.down = view_of(op, "down_embed.weight", down, dt, same, a.device);
  const bool any_mlp = !mlp_gate.is_none() || !mlp_up.is_none() || !mlp_down.is_none();
  const bool all_mlp = !mlp_gate.is_none() && !mlp_up.is_none() && !mlp_down.is_none();
  if (cfg.intermediate > 0 && !all_mlp) {
    fail(concat(op, ": intermediate size is ", cfg.intermediate,
                " so gate_proj, up_proj and down_proj weights are all required"));
  }
  if (cfg.intermediate == 0 && any_mlp) {
    fail(concat(op, ": intermediate size is 0 (no shared MLP) but MLP weights were given"));
  }
  a.weights.mlp.gate = optional_view(op, "gate_proj.weight", mlp_gate, dt, same, a.device);
  a.weights.mlp.up = optional_view(op, "up_proj.weight", mlp_up, dt, same, a.device);
  a.weights.mlp.down = optional_view(op, "down_proj.weight", mlp_down, dt, same, a.device);
  return a;
}

void layer_forward_py(const LayerConfig& cfg, const Array& x, const Array& row,
                      const Array& col, const Array& up, const Array& down,
                      nb::handle mlp_gate, nb::handle mlp_up, nb::handle mlp_down,
                      nb::handle row_mean, nb::handle row_var, nb::handle col_mean,
                      nb::handle col_var, bool training, const Array& y, const Array& saved,
                      const Array& workspace, uintptr_t stream, int num_threads) {
  const char* op = "omnimoe.layer_forward";
  LayerArgs a = layer_args(op, cfg, x, row, col, up, down, mlp_gate, mlp_up, mlp_down);
  RouterNormState norm;
  if (cfg.router_norm == RouterNorm::batch) {
    if (row_mean.is_none() || row_var.is_none() || col_mean.is_none() || col_var.is_none()) {
      fail(concat(op, ": router_norm is batch, so the running mean and variance of "
                      "router_norm_x and router_norm_y are required"));
    }
    const char* f32 = " (batch-norm statistics are float32)";
    norm.row_mean = view_of(op, "router_norm_x.running_mean",
                            nb::cast<Array>(row_mean), DType::f32, f32, a.device);
    norm.row_var = view_of(op, "router_norm_x.running_var",
                           nb::cast<Array>(row_var), DType::f32, f32, a.device);
    norm.col_mean = view_of(op, "router_norm_y.running_mean",
                            nb::cast<Array>(col_mean), DType::f32, f32, a.device);
    norm.col_var = view_of(op, "router_norm_y.running_var",
                           nb::cast<Array>(col_var), DType::f32, f32, a.device);
  }
  const TensorView yv = view_of(op, "y", y, a.x.dtype, " (the dtype of x)", a.device);
  const Buffer sb = buffer_of(op, "saved", saved, a.device);
  const Buffer wb = buffer_of(op, "workspace", workspace, a.device);
  const Exec exec = exec_for(a.device, stream, num_threads);
  nb::gil_scoped_release release;
  layer_forward(cfg, a.x, a.weights, norm, training, yv, sb, wb, exec);
}

void layer_backward_py(const LayerConfig& cfg, const Array& x, const Array& row,
                       const Array& col, const Array& up, const Array& down,
                       nb::handle mlp_gate, nb::handle mlp_up, nb::handle mlp_down,
                       bool training, const Array& saved, const Array& dy, const Array& dx,
                       const Array& d_row, const Array& d_col, const Array& d_up,
                       const Array& d_down, nb::handle d_mlp_gate, nb::handle d_mlp_up,
                       nb::handle d_mlp_down, const Array& workspace, uintptr_t stream,
                       int num_threads) {
  const char* op = "omnimoe.layer_backward";
  LayerArgs a = layer_args(op, cfg, x, row, col, up, down, mlp_gate, mlp_up, mlp_down);
  const char* same = " (the dtype of x)";
  const DType dt = a.x.dtype;
  const TensorView dyv = view_of(op, "dy", dy, dt, same, a.device);
  const TensorView dxv = view_of(op, "dx", dx, dt, same, a.device);
  LayerGrads g;
  g.router.row = view_of(op, "grad of router_gate_x.weight", d_row, dt, same, a.device);
  g.router.col = view_of(op, "grad of router_gate_y.weight", d_col, dt, same, a.device);
  g.experts.up = view_of(op, "grad of up_embed.weight", d_up, dt, same, a.device);
  g.experts.down = view_of(op, "grad of down_embed.weight", d_down, dt, same, a.device);
  g.mlp.gate = optional_view(op, "grad of gate_proj.weight", d_mlp_gate, dt, same, a.device);
  g.mlp.up = optional_view(op, "grad of up_proj.weight", d_mlp_up, dt, same, a.device);
  g.mlp.down = optional_view(op, "grad of down_proj.weight", d_mlp_down, dt, same, a.device);
  const Buffer sb = buffer_of(op, "saved", saved, a.device);
  const Buffer wb = buffer_of(op, "workspace", workspace, a.device);
  const Exec exec = exec_for(a.device, stream, num_threads);
  nb::gil_scoped_release release;
  layer_backward(cfg, a.x, a.weights, training, sb, dyv, dxv, g, wb, exec);
}

// Byte offsets of the routing inside the saved buffer, so callers can read what forward chose.
nb::dict saved_layout(const LayerConfig& cfg, int64_t tokens, const std::string& dtype) {
  const DType dt = parse_dtype(dtype);
  const size_t bytes = layer_saved_bytes(cfg, tokens, dt);
  // Lay the views out over a fake base to read their offsets; no memory is touched.
  char* base = reinterpret_cast<char*>(uintptr_t(1) << 20);
  const LayerSaved s = layer_saved_views(cfg, tokens, dt, Buffer{base, bytes}, Device::cpu());
  nb::dict d;
  auto offset = [&](const TensorView& v) {
    return static_cast<int64_t>(static_cast<char*>(v.data) - base);
  };
  d["indices"] = offset(s.routing.indices);
  d["scores"] = offset(s.routing.scores);
  d["gates"] = offset(s.routing.gates);
  d["bytes"] = static_cast<int64_t>(bytes);
  return d;
}

}  // namespace

NB_MODULE(_omnimoe, m) {
  m.doc() = "Low-level binding of the omnimoe C++ library (use omnimoe.torch for PyTorch).";

  static nb::exception<Error> error(m, "Error", PyExc_RuntimeError);
  // Cached configs (functools.lru_cache) live until interpreter exit, which nanobind reports.
  nb::set_leak_warnings(false);

  m.def("version", &version);
  m.def("cuda_available", &cuda_available,
        "True when this build has the CUDA backend and a CUDA device is visible.");

  nb::class_<LayerConfig>(m, "LayerConfig")
      .def_ro("hidden", &LayerConfig::hidden)
      .def_ro("grid_rows", &LayerConfig::grid_rows)
      .def_ro("grid_cols", &LayerConfig::grid_cols)
      .def_ro("top_k", &LayerConfig::top_k)
      .def_ro("intermediate", &LayerConfig::intermediate)
      .def_ro("norm_eps", &LayerConfig::norm_eps)
      .def_ro("norm_momentum", &LayerConfig::norm_momentum)
      .def_prop_ro("num_experts", &LayerConfig::num_experts)
      .def("describe", &LayerConfig::describe)
      .def("__repr__", [](const LayerConfig& c) { return "LayerConfig(" + c.describe() + ")"; });
  m.def("layer_config", &make_config, nb::arg("hidden"), nb::arg("grid_rows"),
        nb::arg("grid_cols"), nb::arg("top_k"), nb::arg("intermediate") = 0,
        nb::arg("act") = "silu", nb::arg("gating") = "softmax", nb::arg("router_norm") = "batch",
        nb::arg("norm_eps") = 1e-5f, nb::arg("norm_momentum") = 0.1f,
        "A validated LayerConfig; raises omnimoe.Error naming the first bad field.");

  m.def(
      "layer_saved_bytes",
      [](const LayerConfig& cfg, int64_t tokens, const std::string& dtype) {
        return layer_saved_bytes(cfg, tokens, parse_dtype(dtype));
      },
      nb::arg("cfg"), nb::arg("tokens"), nb::arg("dtype"));
  m.def(
      "layer_forward_workspace_bytes",
      [](const LayerConfig& cfg, int64_t tokens, const std::string& dtype,
         const std::string& device, int index) {
        return layer_forward_workspace_bytes(cfg, tokens, parse_dtype(dtype),
                                             exec_for(parse_device(device, index), 0, 0));
      },
      nb::arg("cfg"), nb::arg("tokens"), nb::arg("dtype"), nb::arg("device") = "cpu",
      nb::arg("index") = 0);
  m.def(
      "layer_backward_workspace_bytes",
      [](const LayerConfig& cfg, int64_t tokens, const std::string& dtype,
         const std::string& device, int index) {
        return layer_backward_workspace_bytes(cfg, tokens, parse_dtype(dtype),
                                              exec_for(parse_device(device, index), 0, 0));
      },
      nb::arg("cfg"), nb::arg("tokens"), nb::arg("dtype"), nb::arg("device") = "cpu",
      nb::arg("index") = 0);
  m.def(
      "experts_execution",
      [](const LayerConfig& cfg, int64_t tokens, const std::string& dtype,
         const std::string& device, int index) {
        return std::string(experts_execution(cfg, tokens, parse_dtype(dtype),
                                             exec_for(parse_device(device, index), 0, 0)));
      },
      nb::arg("cfg"), nb::arg("tokens"), nb::arg("dtype"), nb::arg("device") = "cpu",
      nb::arg("index") = 0);
  m.def("saved_layout", &saved_layout, nb::arg("cfg"), nb::arg("tokens"), nb::arg("dtype"),
        "Byte offsets of indices (i32 [T, K]), scores and gates (f32 [T, K]) in the saved "
        "buffer, and its size.");

  m.def("layer_forward", &layer_forward_py, nb::arg("cfg"), nb::arg("x"), nb::arg("row"),
        nb::arg("col"), nb::arg("up"), nb::arg("down"), nb::arg("mlp_gate").none(),
        nb::arg("mlp_up").none(), nb::arg("mlp_down").none(), nb::arg("row_mean").none(),
        nb::arg("row_var").none(), nb::arg("col_mean").none(), nb::arg("col_var").none(),
        nb::arg("training"), nb::arg("y"), nb::arg("saved"), nb::arg("workspace"),
        nb::arg("stream") = 0, nb::arg("num_threads") = 0,
        "y = layer(x); writes y [T, d] and the saved buffer, updates the running statistics "
        "when training with router_norm = batch. All memory is the caller's.");
  m.def("layer_backward", &layer_backward_py, nb::arg("cfg"), nb::arg("x"), nb::arg("row"),
        nb::arg("col"), nb::arg("up"), nb::arg("down"), nb::arg("mlp_gate").none(),
        nb::arg("mlp_up").none(), nb::arg("mlp_down").none(), nb::arg("training"),
        nb::arg("saved"), nb::arg("dy"), nb::arg("dx"), nb::arg("d_row"), nb::arg("d_col"),
        nb::arg("d_up"), nb::arg("d_down"), nb::arg("d_mlp_gate").none(),
        nb::arg("d_mlp_up").none(), nb::arg("d_mlp_down").none(), nb::arg("workspace"),
        nb::arg("stream") = 0, nb::arg("num_threads") = 0,
        "Gradients of the layer from dy and the saved buffer of the matching forward "
        "(every output overwritten).");
}
