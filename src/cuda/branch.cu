// BranchFork on CUDA: cached side streams per device and lane, fork and join by event
// record/wait.
#include <map>
#include <mutex>
#include <utility>

#include "backend/branch.h"
#include "cuda/cuda_common.cuh"

namespace omnimoe::detail {
namespace {

// Creating (and destroying) streams and events is not a stream operation, but a global-mode capture on another
// thread would reject it as "unsafe"; relax the mode for this thread while creating them.
class RelaxedCapture {
 public:
  RelaxedCapture() { OMNIMOE_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode_)); }
  ~RelaxedCapture() { cudaThreadExchangeStreamCaptureMode(&mode_); }  // restores; cannot throw
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

// One side stream per (device, lane), created on first use and kept for the life of the
// process (like the cuBLASLt handles). Non-blocking: it orders against the caller only through
// our events.
// Greatest priority: the block scheduler hands freed SMs to its kernels first, so a chain of
// small kernels there advances while a GEMM on the caller's (default-priority) stream fills the
// device. Captured kernels keep it as a node attribute, honoured by graphs instantiated with
// cudaGraphInstantiateFlagUseNodePriority.
cudaStream_t side_stream_for(int device, int lane) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, cudaStream_t> streams;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = streams.find({device, lane});
  if (it != streams.end()) return it->second;
  cudaStream_t s = nullptr;
  {
    RelaxedCapture relaxed;
    int least = 0, greatest = 0;
    OMNIMOE_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    OMNIMOE_CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, greatest));
  }
  streams.emplace(std::make_pair(device, lane), s);
  return s;
}

// One event per (thread, device), created on first use and reused: cudaStreamWaitEvent waits for
// the record made just before it, so re-recording later is safe, and no other thread records
// this one between our record and wait. Creating events per call cost host time on every layer
// call (creation and destruction are not stream operations and need the capture mode relaxed).
cudaEvent_t event_for(int device) {
  struct Events {
    std::map<int, cudaEvent_t> by_device;
    ~Events() {
      for (auto& [d, e] : by_device) cudaEventDestroy(e);  // at thread exit; errors ignored
    }
  };
  thread_local Events events;
  auto it = events.by_device.find(device);
  if (it != events.by_device.end()) return it->second;
  cudaEvent_t event = nullptr;
  {
    RelaxedCapture relaxed;
    OMNIMOE_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  }
  events.by_device.emplace(device, event);
  return event;
}

// Makes `to` wait for everything queued on `from` so far.
void order_after(cudaStream_t from, cudaStream_t to, int device) {
  const cudaEvent_t event = event_for(device);
  cudaError_t err = cudaEventRecord(event, from);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(to, event, 0);
  if (err != cudaSuccess) {
    cudaGetLastError();
    OMNIMOE_FAIL("branch fork/join: cudaEventRecord/cudaStreamWaitEvent failed: ",
                 cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
  }
}

}  // namespace

BranchFork::BranchFork(const Exec& exec, int lane) : exec_(exec), side_(exec) {
  if (exec.device.type != DeviceType::cuda) return;
  cuda::DeviceGuard guard(exec);
  const cudaStream_t side = side_stream_for(exec.device.index, lane);
  OMNIMOE_CHECK(side != cuda::stream_of(exec), "BranchFork: lane ", lane,
                " is the stream it forks from; a nested fork needs another lane");
  order_after(cuda::stream_of(exec), side, exec.device.index);
  side_.stream = side;
}

void BranchFork::join() {
  if (side_.stream == exec_.stream) return;
  cuda::DeviceGuard guard(exec_);
  const cudaStream_t side = cuda::stream_of(side_);
  side_.stream = exec_.stream;  // joined: later calls (and the destructor) do nothing
  order_after(side, cuda::stream_of(exec_), exec_.device.index);
}

// An exception between fork and join still joins, so a capture in progress stays joinable.
BranchFork::~BranchFork() {
  try {
    join();
  } catch (...) {
  }
}

}  // namespace omnimoe::detail
