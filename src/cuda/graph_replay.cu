// Layer calls as cached CUDA graph replays (backend/graph_replay.h).
#include "backend/graph_replay.h"

#include <cstdint>
#include <map>
#include <mutex>

#include "core/env.h"
#include "cuda/cuda_common.cuh"
#include "cuda/stream_order.cuh"

namespace omnimoe::detail {
namespace {

// Executable graphs by key, the least recently used dropped beyond kMaxGraphs (a model with more
// distinct layer shapes than that re-instantiates some on every step instead of growing).
constexpr size_t kMaxGraphs = 32;

struct CachedGraph {
  cudaGraphExec_t exec = nullptr;
  uint64_t last_use = 0;
};

class GraphCache {
 public:
  // The cached graph of `key` made to do what `graph` does, instantiated if it could not be
  // updated to it.
  cudaGraphExec_t fit(const std::string& key, cudaGraph_t graph) {
    if (auto it = graphs_.find(key); it != graphs_.end()) {
      it->second.last_use = ++clock_;
      cudaGraphExecUpdateResultInfo info{};
      if (cudaGraphExecUpdate(it->second.exec, graph, &info) == cudaSuccess) {
        return it->second.exec;
      }
      cudaGetLastError();  // other nodes or other kernels in them: instantiate anew
      cudaGraphExecDestroy(it->second.exec);  // launches in flight finish first
      graphs_.erase(it);
    }
    // Node priorities kept: the expert branch's stream has the greatest (branch.cu). Cached only
    // once instantiated, so every entry holds a graph.
    cudaGraphExec_t exec = nullptr;
    OMNIMOE_CUDA_CHECK(
        cudaGraphInstantiateWithFlags(&exec, graph, cudaGraphInstantiateFlagUseNodePriority));
    graphs_[key] = CachedGraph{exec, ++clock_};
    if (graphs_.size() > kMaxGraphs) drop_oldest();
    return exec;
  }

 private:
  void drop_oldest() {
    auto oldest = graphs_.begin();
    for (auto it = graphs_.begin(); it != graphs_.end(); ++it) {
      if (it->second.last_use < oldest->second.last_use) oldest = it;
    }
    cudaGraphExecDestroy(oldest->second.exec);
    graphs_.erase(oldest);
  }

  std::map<std::string, CachedGraph> graphs_;
  uint64_t clock_ = 0;
};

// Ends a capture that the issued work left by an exception, so the stream is usable again.
class CaptureScope {
 public:
  explicit CaptureScope(cudaStream_t s) : s_(s) {
    OMNIMOE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  }
  cudaGraph_t end() {
    cudaGraph_t graph = nullptr;
    const cudaError_t err = cudaStreamEndCapture(s_, &graph);
    s_ = nullptr;
    if (err != cudaSuccess) {
      cudaGetLastError();
      OMNIMOE_FAIL("graph replay: the layer's work could not be captured: ",
                   cudaGetErrorName(err), " (", cudaGetErrorString(err),
                   "); OMNIMOE_GRAPH_REPLAY=off or Exec::graph_replay = false launch it directly");
    }
    return graph;
  }
  ~CaptureScope() {
    if (s_ == nullptr) return;
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(s_, &graph);
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
  }
  CaptureScope(const CaptureScope&) = delete;
  CaptureScope& operator=(const CaptureScope&) = delete;

 private:
  cudaStream_t s_;
};

// Destroys the captured graph; none when the capture threw (destroying a null graph would leave
// cudaErrorInvalidValue pending, which CUB's next call reports as an invalid device).
struct GraphOwner {
  cudaGraph_t graph;
  ~GraphOwner() {
    if (graph != nullptr) cudaGraphDestroy(graph);
  }
};

bool replay_disabled() {
  static const bool off = env_equals("OMNIMOE_GRAPH_REPLAY", "off");
  return off;
}

// Whether `s` is being captured; a query that fails (the legacy stream while another thread
// captures in global mode) counts as captured, so the work is issued directly.
bool capturing(cudaStream_t s) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(s, &status) != cudaSuccess) {
    cudaGetLastError();
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace

void issue_as_graph(const Exec& exec, const std::string& key,
                    const std::function<void(const Exec&)>& issue) {
  if (exec.device.type != DeviceType::cuda || !exec.graph_replay || replay_disabled()) {
    return issue(exec);
  }
  cuda::DeviceGuard guard(exec);
  const cudaStream_t caller = cuda::stream_of(exec);
  if (capturing(caller)) return issue(exec);

  // One capture at a time: the capture stream and the cache are shared by all threads.
  static std::mutex mutex;
  static GraphCache cache;
  std::lock_guard<std::mutex> lock(mutex);
  const int device = exec.device.index;
  // Captured on a library stream (the caller's may be the legacy stream, which cannot be
  // captured) of least priority, as a default-priority caller's: the kernels keep the priority
  // they would have had there. Only recorded there; the graph runs on the caller's stream.
  const cudaStream_t s = cuda::library_stream(device, cuda::StreamPriority::least);
  Exec inner = exec;
  inner.stream = s;
  GraphOwner owner{nullptr};
  {
    CaptureScope capture(s);
    issue(inner);
    owner.graph = capture.end();
  }
  // The caller's stream in the key: launches of one executable graph run one after another, so
  // calls on two streams get a graph each and stay free to overlap.
  const std::string where = std::to_string(device) + "/" +
                            std::to_string(reinterpret_cast<uintptr_t>(caller)) + "/" + key;
  OMNIMOE_CUDA_CHECK(cudaGraphLaunch(cache.fit(where, owner.graph), caller));
}

}  // namespace omnimoe::detail
