#!/usr/bin/env bash
# session 15, call 1: the final build of session 14 (kernels 462a531, tests 1c3ead3): the whole
# CUDA suite (the error_of refactor had not run on a GPU), then OMNIMOE_TILED_PASS_COLUMNS
# 512/1024 against the default at paper-k512-t16k and paper-k512-t4k.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib
mkdir -p build-dev $OUT/s15
tar xzf build-carry/build.tgz -C build-dev || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 200 build-dev/tests/omnimoe_cuda_tests --gtest_brief=1 > $OUT/s15/suite.log 2>&1
echo "suite rc $?"; grep -E "^\[  FAILED|^\[  PASSED" $OUT/s15/suite.log | head
OUT=$OUT/s15 AB_BINS=build-dev/omnimoe AB_CONFIGS="paper-k512-t16k paper-k512-t4k" AB_ROUNDS=2 AB_ITERS=15 \
  AB_ENVS="default OMNIMOE_TILED_PASS_COLUMNS=512 OMNIMOE_TILED_PASS_COLUMNS=1024" \
  timeout 300 bash scripts/device/ab_bench.sh
