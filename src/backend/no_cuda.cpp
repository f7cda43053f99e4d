// Built only without a CUDA toolkit: the one CUDA query the public API has.
#include <omnimoe/omnimoe.h>

namespace omnimoe {
bool cuda_available() { return false; }
}  // namespace omnimoe
