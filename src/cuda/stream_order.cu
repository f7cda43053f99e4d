// Library-owned streams and stream ordering by events (stream_order.cuh).
#include "cuda/stream_order.cuh"

#include <map>
#include <mutex>
#include <utility>

#include "cuda/cuda_common.cuh"

namespace omnimoe::cuda {

RelaxedCapture::RelaxedCapture() {
  OMNIMOE_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode_));
}

RelaxedCapture::~RelaxedCapture() { cudaThreadExchangeStreamCaptureMode(&mode_); }

cudaStream_t library_stream(int device, StreamPriority priority) {
  static std::mutex mutex;
  static std::map<std::pair<int, StreamPriority>, cudaStream_t> streams;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, priority);
  if (auto it = streams.find(key); it != streams.end()) return it->second;
  cudaStream_t s = nullptr;
  {
    RelaxedCapture relaxed;
    int least = 0, greatest = 0;
    OMNIMOE_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    OMNIMOE_CUDA_CHECK(cudaStreamCreateWithPriority(
        &s, cudaStreamNonBlocking, priority == StreamPriority::greatest ? greatest : least));
  }
  streams.emplace(key, s);
  return s;
}

namespace {

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

}  // namespace

void order_after(cudaStream_t from, cudaStream_t to, int device) {
  const cudaEvent_t event = event_for(device);
  cudaError_t err = cudaEventRecord(event, from);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(to, event, 0);
  if (err != cudaSuccess) {
    cudaGetLastError();
    OMNIMOE_FAIL("stream order: cudaEventRecord/cudaStreamWaitEvent failed: ",
                 cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
  }
}

}  // namespace omnimoe::cuda
