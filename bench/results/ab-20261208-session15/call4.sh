#!/usr/bin/env bash
# session 15, call 4 (call 3 cut to the budget left): the final tree's suite, determinism x20,
# memcheck and racecheck on the tiled tests that build blocks in place, all eight benches.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib
mkdir -p build-dev $OUT/s15
tar xzf build-carry/build.tgz -C build-dev || exit 1
timeout 30 build-dev/tests/omnimoe_cuda_tests --gtest_filter='ExpertsTiledCudaDeterminism.*' \
  --gtest_repeat=20 --gtest_brief=1 > $OUT/s15/det_dev.log 2>&1
echo "det20 dev rc $? failures $(grep -c '^\[  FAILED' $OUT/s15/det_dev.log)"
SANITIZE_FILTER='*ExpertsTiledCudaPasses*:*ExpertsTiledCuda.*d264*:*ExpertsTiledCuda.*d37*' \
AB_CONFIGS=ref-quickstart \
BENCH_CONFIGS="ref-quickstart pool-1m-k16 paper-k4096-t4k paper-k4096-t1k pool-1m-k256 paper-k512-t1k paper-k512-t4k paper-k512-t16k" \
  timeout 190 bash scripts/device/change_check.sh
