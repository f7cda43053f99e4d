// Fork/join of two branches of work inside one op call. On CUDA, side() runs on a library-owned
// stream (one per device, non-blocking, greatest priority) that first waits for everything
// already queued on exec.stream, and join() makes exec.stream wait for the side stream; both are
// event record/wait pairs, so they work on the legacy default stream and are captured into a
// CUDA graph as two parallel branches. On the CPU side() is exec itself and join() does nothing.
#pragma once

#include <omnimoe/omnimoe.h>

namespace omnimoe::detail {

class BranchFork {
 public:
  explicit BranchFork(const Exec& exec);
  ~BranchFork();
  BranchFork(const BranchFork&) = delete;
  BranchFork& operator=(const BranchFork&) = delete;

  // Work issued on side() runs concurrently with work issued on the caller's exec.
  const Exec& side() const { return side_; }
  // exec.stream waits for everything issued on side() so far. Call once, after the side work.
  void join();

 private:
  Exec exec_;
  Exec side_;
};

}  // namespace omnimoe::detail
