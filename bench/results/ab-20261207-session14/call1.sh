#!/usr/bin/env bash
# session 14 first call: determinism x40 on main and branch, branch change_check (tests,
# sanitizers on tiled cases, A/B), main's full suite, tiled stage timing on both, ncu on main.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib
mkdir -p build-dev build-base $OUT/s14
tar xzf build-carry/build.tgz -C build-dev && tar xzf build-carry/base.tgz -C build-base || exit 1
for b in build-base build-dev; do
  timeout 90 $b/tests/omnimoe_cuda_tests --gtest_filter='ExpertsTiledCudaDeterminism.*' \
    --gtest_repeat=40 --gtest_brief=1 > $OUT/s14/det_$b.log 2>&1
  echo "det40 $b rc $? $(grep -c FAILED $OUT/s14/det_$b.log) failed-lines"
done
SANITIZE_FILTER='*ExpertsTiled*-*Timing*' \
AB_CONFIGS="paper-k512-t4k paper-k512-t16k paper-k4096-t4k" \
AB_ENVS="default OMNIMOE_TILED_COEF_BLOCKS=0" timeout 330 bash scripts/device/change_check.sh
mkdir -p build-dev build-base
tar xzf build-carry/build.tgz -C build-dev && tar xzf build-carry/base.tgz -C build-base
timeout 150 build-base/tests/omnimoe_cuda_tests --gtest_brief=1 > $OUT/s14/base_suite.log 2>&1
echo "base suite rc $?"; grep -E "^\[  FAILED|^\[  PASSED" $OUT/s14/base_suite.log | head
for b in build-base build-dev; do
  timeout 60 $b/tests/omnimoe_cuda_tests --gtest_also_run_disabled_tests \
    --gtest_filter='ExpertsTiledCudaTiming.*' > $OUT/s14/timing_$b.log 2>&1
  echo "timing $b rc $?"
done
OUT=$OUT/s14 PROF_BIN=build-base/omnimoe PROF_TIMEOUT=120 bash scripts/device/prof_tiled.sh
