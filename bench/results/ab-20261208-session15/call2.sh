#!/usr/bin/env bash
# session 15, call 2: dev = 160-slot dot tiles + the backward's g.h blocks over da's (one set) +
# token sums with 3 stages whose loads run across column blocks + expert sums in 3 stages of 64
# tokens (coefficients and rows); variant "nested" = 160-slot dot, one g.h set, with
# the token sums in 3 stages restarting per column block (omnimoe only); base = session 14's final
# build (462a531, omnimoe only). Determinism x20 on dev; change_check (dev suite, sanitizers on
# the tiled tests, A/B of the three builds at k512-t4k/t16k with the dot width by default (160)
# and 64, all eight benches by dev); stage timings of the three builds; ncu of dev's products (PROFILE_TILED=1).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib
mkdir -p build-dev $OUT/s15
tar xzf build-carry/build.tgz -C build-dev || exit 1
timeout 60 build-dev/tests/omnimoe_cuda_tests --gtest_filter='ExpertsTiledCudaDeterminism.*' \
  --gtest_repeat=20 --gtest_brief=1 > $OUT/s15/det_dev.log 2>&1
echo "det20 dev rc $? failures $(grep -c '^\[  FAILED' $OUT/s15/det_dev.log)"
SANITIZE_FILTER='*ExpertsTiled*-*Timing*' AB_CONFIGS="paper-k512-t4k paper-k512-t16k" \
AB_ENVS="default OMNIMOE_TILED_DOT_SLOTS=64" \
BENCH_CONFIGS="ref-quickstart pool-1m-k16 paper-k4096-t4k paper-k4096-t1k pool-1m-k256 paper-k512-t1k paper-k512-t4k paper-k512-t16k" \
  timeout 400 bash scripts/device/change_check.sh
for c in paper-k512-t4k paper-k512-t16k; do
  for b in build-base build-nested build-dev; do
    OMNIMOE_TILED_TIMING=1 timeout 40 $b/omnimoe bench --device cuda --config $c --warmup 1 \
      --iters 2 --skip-baselines --skip-ceilings > /dev/null 2> $OUT/s15/stages_${c}_$b.txt
    echo "stages $c $b rc $?"; grep experts_tiled $OUT/s15/stages_${c}_$b.txt | tail -2 | cut -c1-220
  done
done
for cols in 512 1024; do  # 2 passes and 1 pass of the token sums at t16k (default 3)
  OMNIMOE_TILED_PASS_COLUMNS=$cols OMNIMOE_TILED_TIMING=1 timeout 40 build-dev/omnimoe bench \
    --device cuda --config paper-k512-t16k --warmup 1 --iters 2 --skip-baselines --skip-ceilings \
    > $OUT/s15/pass$cols.txt 2> $OUT/s15/stages_pass$cols.txt
  echo "pass columns $cols rc $?"; grep experts_tiled $OUT/s15/stages_pass$cols.txt | tail -2 | cut -c1-220
  grep -E "^  layer forward" $OUT/s15/pass$cols.txt | cut -c1-100
done
[ "${PROFILE_TILED:-0}" = 1 ] && OUT=$OUT/s15 PROF_BIN=build-dev/omnimoe PROF_TIMEOUT=120 PROF_LAUNCHES=10 bash scripts/device/prof_tiled.sh
