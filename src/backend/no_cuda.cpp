// Built only without a CUDA toolkit: the one CUDA query the public API has, the CPU-only
// BranchFork (both branches run on the caller's thread, in order) and graph replay (the work is
// issued directly).
#include <omnimoe/omnimoe.h>

#include "backend/branch.h"
#include "backend/graph_replay.h"

namespace omnimoe {
bool cuda_available() { return false; }

namespace detail {
BranchFork::BranchFork(const Exec& exec) : exec_(exec), side_(exec) {}
void BranchFork::join() {}
BranchFork::~BranchFork() = default;

void issue_as_graph(const Exec& exec, const std::string&,
                    const std::function<void(const Exec&)>& issue) {
  issue(exec);
}
}  // namespace detail
}  // namespace omnimoe
