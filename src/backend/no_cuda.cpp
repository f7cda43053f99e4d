// Built only without a CUDA toolkit: the one CUDA query the public API has, and the CPU-only
// BranchFork (both branches run on the caller's thread, in order).
#include <omnimoe/omnimoe.h>

#include "backend/branch.h"

namespace omnimoe {
bool cuda_available() { return false; }

namespace detail {
BranchFork::BranchFork(const Exec& exec, int) : exec_(exec), side_(exec) {}
void BranchFork::join() {}
BranchFork::~BranchFork() = default;
}  // namespace detail
}  // namespace omnimoe
