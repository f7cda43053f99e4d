// Deterministic uniform numbers from (seed, index), identical on the host and on a GPU, so the
// CPU and CUDA runs of `omnimoe check` see the same inputs however they were filled.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define OMNIMOE_TOOL_HD __host__ __device__ __forceinline__
#else
#define OMNIMOE_TOOL_HD inline
#endif

namespace omnimoe::tool {

// splitmix64's finaliser: every input bit moves every output bit.
OMNIMOE_TOOL_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// In [lo, hi): 24 random bits, offset by half a step so the unit value is never 0 or 1.
OMNIMOE_TOOL_HD float uniform_at(uint64_t seed, uint64_t index, float lo, float hi) {
  const uint64_t h = mix64(seed * 0x9e3779b97f4a7c15ull + index + 1);
  const float unit = (static_cast<float>(h >> 40) + 0.5f) * (1.0f / 16777216.0f);
  return lo + (hi - lo) * unit;
}

}  // namespace omnimoe::tool
