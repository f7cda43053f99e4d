// Library-owned streams and the event record / wait that orders one stream after another: what
// BranchFork (branch.cu) and the layer's graph replay (graph_replay.cu) are built from. All of
// it works on the legacy default stream and inside a stream capture.
#pragma once

#include <cuda_runtime.h>

namespace omnimoe::cuda {

// For this thread, relaxes the stream-capture mode while creating streams and events: these are
// not stream operations, but a global-mode capture on another thread would reject them as
// "unsafe".
class RelaxedCapture {
 public:
  RelaxedCapture();
  ~RelaxedCapture();  // restores the mode; cannot throw
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

enum class StreamPriority { greatest, least };

// One non-blocking stream per (device, priority), created on first use and kept for the
// life of the process (like the cuBLASLt handles). It orders against other streams only through
// order_after().
cudaStream_t library_stream(int device, StreamPriority priority);

// Makes `to` wait for everything queued on `from` so far (an event record / wait pair).
void order_after(cudaStream_t from, cudaStream_t to, int device);

}  // namespace omnimoe::cuda
