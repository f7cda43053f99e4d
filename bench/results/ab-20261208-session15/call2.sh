#!/usr/bin/env bash
# session 15, call 2: dev = 160-slot dot tiles + the backward's g.h blocks over da's (one set);
# base = session 14's final build (462a531). Determinism x20 on dev; change_check (dev suite,
# sanitizers on the tiled tests, A/B at k512-t4k/t16k with the dot width 160 (default) and 64,
# all eight benches); tiled stage timing of dev with both widths.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib
mkdir -p build-dev $OUT/s15
tar xzf build-carry/build.tgz -C build-dev || exit 1
timeout 60 build-dev/tests/omnimoe_cuda_tests --gtest_filter='ExpertsTiledCudaDeterminism.*' \
  --gtest_repeat=20 --gtest_brief=1 > $OUT/s15/det_dev.log 2>&1
echo "det20 dev rc $? failures $(grep -c '^\[  FAILED' $OUT/s15/det_dev.log)"
for w in 160 64; do
  OMNIMOE_TILED_DOT_SLOTS=$w OMNIMOE_TILED_SHAPES=paper-k512-t4k,paper-k512-t16k,paper-k4096-t4k \
    timeout 90 build-dev/tests/omnimoe_cuda_tests --gtest_also_run_disabled_tests \
    --gtest_filter='ExpertsTiledCudaTiming.*' > $OUT/s15/timing_dot$w.log 2>&1
  echo "timing dot$w rc $?"; grep -E "tiled  deterministic|experts_tiled" $OUT/s15/timing_dot$w.log | cut -c1-210 | head -18
done
SANITIZE_FILTER='*ExpertsTiled*-*Timing*' AB_CONFIGS="paper-k512-t4k paper-k512-t16k" \
AB_ENVS="default OMNIMOE_TILED_DOT_SLOTS=64" \
BENCH_CONFIGS="ref-quickstart pool-1m-k16 paper-k4096-t4k paper-k4096-t1k pool-1m-k256 paper-k512-t1k paper-k512-t4k paper-k512-t16k" \
  timeout 380 bash scripts/device/change_check.sh
# ncu of the dev build's products at paper-k512-t16k: dot (fwd), token sums x3, dot (bwd), token
# sums x3, the expert sums' two passes of dW.
OUT=$OUT/s15 PROF_BIN=build-dev/omnimoe PROF_TIMEOUT=170 PROF_LAUNCHES=10 bash scripts/device/prof_tiled.sh
