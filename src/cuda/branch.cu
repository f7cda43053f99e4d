// BranchFork on CUDA: a library stream per device (stream_order.cuh), fork and join by event
// record / wait.
#include "backend/branch.h"
#include "cuda/cuda_common.cuh"
#include "cuda/stream_order.cuh"

namespace omnimoe::detail {

// The side stream has the greatest priority: the block scheduler hands freed SMs to its kernels
// first, so a chain of small kernels there advances while a GEMM on the caller's
// (default-priority) stream fills the device. Captured kernels keep it as a node attribute,
// honoured by graphs instantiated with cudaGraphInstantiateFlagUseNodePriority.
BranchFork::BranchFork(const Exec& exec) : exec_(exec), side_(exec) {
  if (exec.device.type != DeviceType::cuda) return;
  cuda::DeviceGuard guard(exec, /*check_pending=*/false);
  const cudaStream_t side =
      cuda::library_stream(exec.device.index, cuda::StreamPriority::greatest);
  cuda::order_after(cuda::stream_of(exec), side, exec.device.index);
  side_.stream = side;
}

void BranchFork::join() {
  if (side_.stream == exec_.stream) return;
  cuda::DeviceGuard guard(exec_, /*check_pending=*/false);
  const cudaStream_t side = cuda::stream_of(side_);
  side_.stream = exec_.stream;  // joined: later calls (and the destructor) do nothing
  cuda::order_after(side, cuda::stream_of(exec_), exec_.device.index);
}

// An exception between fork and join still joins, so a capture in progress stays joinable.
BranchFork::~BranchFork() {
  try {
    join();
  } catch (...) {
  }
}

}  // namespace omnimoe::detail
