// The OMNIMOE_* overrides read from the environment (src/core/env.h): a count that is set must
// be valid, and a bad one is an error naming the variable, not a silent fallback.
#include <gtest/gtest.h>
#include <omnimoe/omnimoe.h>

#include <cstdlib>
#include <string>

#include "core/env.h"
#include "test_support.h"

namespace omnimoe::test {
namespace {

constexpr const char* kVar = "OMNIMOE_TEST_ENV_COUNT";

std::string count_error(const char* value, int64_t multiple) {
  setenv(kVar, value, 1);
  const std::string what = error_of([&] { detail::env_count(kVar, multiple); });
  unsetenv(kVar);
  return what;
}

TEST(EnvCount, UnsetOrEmptyIsMinusOne) {
  unsetenv(kVar);
  EXPECT_EQ(detail::env_count(kVar, 128), -1);
  setenv(kVar, "", 1);
  EXPECT_EQ(detail::env_count(kVar, 128), -1);
  unsetenv(kVar);
}

TEST(EnvCount, ValidValuesAreRead) {
  setenv(kVar, "0", 1);
  EXPECT_EQ(detail::env_count(kVar, 128), 0);
  setenv(kVar, "384", 1);
  EXPECT_EQ(detail::env_count(kVar, 128), 384);
  setenv(kVar, "7", 1);
  EXPECT_EQ(detail::env_count(kVar), 7);
  unsetenv(kVar);
}

TEST(EnvCount, BadValuesAreNamed) {
  EXPECT_NE(count_error("100", 128).find(
                "OMNIMOE_TEST_ENV_COUNT must be 0 or a positive multiple of 128, got \"100\""),
            std::string::npos);
  EXPECT_NE(count_error("-1", 1).find(
                "OMNIMOE_TEST_ENV_COUNT must be 0 or a positive integer, got \"-1\""),
            std::string::npos);
  EXPECT_NE(count_error("12x", 1).find("got \"12x\""), std::string::npos);
}

}  // namespace
}  // namespace omnimoe::test
