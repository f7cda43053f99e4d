#!/usr/bin/env bash
# session 14, call 2: determinism x40 on main+fix (base) and branch+fix (dev); change_check
# (dev suite, sanitizers on tiled incl. determinism, A/B at t16k, all eight benches); base suite.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib
mkdir -p build-dev build-base $OUT/s14
tar xzf build-carry/build.tgz -C build-dev && tar xzf build-carry/base.tgz -C build-base || exit 1
for b in build-base build-dev; do
  timeout 60 $b/tests/omnimoe_cuda_tests --gtest_filter='ExpertsTiledCudaDeterminism.*' \
    --gtest_repeat=40 --gtest_brief=1 > $OUT/s14/det_$b.log 2>&1
  echo "det40 $b rc $? failures $(grep -c '^\[  FAILED' $OUT/s14/det_$b.log) $(grep -m1 differs $OUT/s14/det_$b.log)"
done
SANITIZE_FILTER='*ExpertsTiled*-*Timing*' AB_CONFIGS="paper-k512-t4k paper-k512-t16k" AB_ENVS=default \
BENCH_CONFIGS="ref-quickstart pool-1m-k16 paper-k4096-t4k paper-k4096-t1k pool-1m-k256 paper-k512-t1k paper-k512-t4k paper-k512-t16k" \
  timeout 400 bash scripts/device/change_check.sh
timeout 120 build-base/tests/omnimoe_cuda_tests --gtest_brief=1 > $OUT/s14/base_suite.log 2>&1
echo "base suite rc $?"; grep -E "^\[  FAILED|^\[  PASSED" $OUT/s14/base_suite.log | head
timeout 60 build-dev/tests/omnimoe_cuda_tests --gtest_also_run_disabled_tests \
  --gtest_filter='ExpertsTiledCudaTiming.*' > $OUT/s14/timing_dev.log 2>&1
echo "timing dev rc $?"; grep -E "deterministic|forward\]" $OUT/s14/timing_dev.log | head -8 | cut -c1-150
