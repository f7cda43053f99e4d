// BranchFork's lanes on CUDA: a fork nested in a side branch (the layer backward's schedule
// stream) gets a stream of its own, and its join orders its work before the side branch's next.
#include <cstdint>
#include <vector>

#include "backend/branch.h"
#include "cuda_test_support.h"

namespace omnimoe::test {
namespace {

TEST(BranchForkCuda, NestedLaneRunsApartAndJoinsInOrder) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  constexpr size_t kBytes = size_t{64} << 20;  // long enough that an unordered copy would race
  DeviceBuffer a(kBytes), b(kBytes);
  CudaStream stream;
  const Exec exec = cuda_exec(stream.get());
  OMNIMOE_TEST_CUDA_CHECK(cudaMemsetAsync(b.data(), 0, kBytes, stream.get()));
  {
    detail::BranchFork fork(exec);
    const Exec& side = fork.side();
    EXPECT_NE(side.stream, exec.stream);
    detail::BranchFork nested(side, /*lane=*/1);
    EXPECT_NE(nested.side().stream, side.stream);
    EXPECT_NE(nested.side().stream, exec.stream);
    OMNIMOE_TEST_CUDA_CHECK(cudaMemsetAsync(a.data(), 0x5a, kBytes,
                                            static_cast<cudaStream_t>(nested.side().stream)));
    nested.join();  // side waits for the memset
    OMNIMOE_TEST_CUDA_CHECK(cudaMemcpyAsync(b.data(), a.data(), kBytes, cudaMemcpyDeviceToDevice,
                                            static_cast<cudaStream_t>(side.stream)));
    fork.join();  // the caller's stream waits for the copy
  }
  std::vector<uint8_t> host(kBytes);
  OMNIMOE_TEST_CUDA_CHECK(
      cudaMemcpyAsync(host.data(), b.data(), kBytes, cudaMemcpyDeviceToHost, stream.get()));
  stream.synchronize();
  for (size_t i = 0; i < kBytes; i += 4099) ASSERT_EQ(host[i], 0x5a) << "byte " << i;
  ASSERT_EQ(host[kBytes - 1], 0x5a);
}

TEST(BranchForkCuda, NestedForkOnItsOwnLaneIsRefused) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  CudaStream stream;
  detail::BranchFork fork(cuda_exec(stream.get()));
  EXPECT_THROW(detail::BranchFork(fork.side(), /*lane=*/0), Error);
}

}  // namespace
}  // namespace omnimoe::test
