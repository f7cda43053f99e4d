// The whole public API. Plain C++17: needs neither CUDA nor an ML framework to include.
#pragma once

#include <omnimoe/config.h>
#include <omnimoe/error.h>
#include <omnimoe/experts.h>
#include <omnimoe/layer.h>
#include <omnimoe/mlp.h>
#include <omnimoe/router.h>
#include <omnimoe/schedule.h>
#include <omnimoe/tensor.h>

#define OMNIMOE_VERSION_MAJOR 0
#define OMNIMOE_VERSION_MINOR 1
#define OMNIMOE_VERSION_PATCH 0

namespace omnimoe {
const char* version();  // "0.1.0"
}  // namespace omnimoe
