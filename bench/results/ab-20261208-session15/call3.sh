#!/usr/bin/env bash
# session 15, call 3: the final tree (dev: session 14's dot and expert sums, token sums in 3
# stages restarting per column block, the backward's g.h blocks over da's) against session 14's
# build (base, omnimoe only). Determinism x20; change_check (suite, memcheck and racecheck on
# the tiled tests that build blocks in place (the token sums' slot lists now share the stages'
# space): the pass tests, d = 264 with 600 slots, d = 37; A/B at k512-t16k (10 runs) with the
# token sums' columns per pass by default and 256; all eight benches by dev); stage timings of
# dev at k512-t16k with the default and 256 columns per pass.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib
mkdir -p build-dev $OUT/s15
tar xzf build-carry/build.tgz -C build-dev || exit 1
timeout 60 build-dev/tests/omnimoe_cuda_tests --gtest_filter='ExpertsTiledCudaDeterminism.*' \
  --gtest_repeat=20 --gtest_brief=1 > $OUT/s15/det_dev.log 2>&1
echo "det20 dev rc $? failures $(grep -c '^\[  FAILED' $OUT/s15/det_dev.log)"
SANITIZE_FILTER='*ExpertsTiledCudaPasses*:*ExpertsTiledCuda.*d264*:*ExpertsTiledCuda.*d37*' \
AB_CONFIGS="paper-k512-t16k" AB_ENVS="default OMNIMOE_TILED_PASS_COLUMNS=256" AB_ITERS=10 \
BENCH_CONFIGS="ref-quickstart pool-1m-k16 paper-k4096-t4k paper-k4096-t1k pool-1m-k256 paper-k512-t1k paper-k512-t4k paper-k512-t16k" \
  timeout 230 bash scripts/device/change_check.sh
for c in paper-k512-t16k; do
  for cols in default 256; do
    envs=(OMNIMOE_TILED_TIMING=1); [ $cols = default ] || envs+=(OMNIMOE_TILED_PASS_COLUMNS=$cols)
    env "${envs[@]}" timeout 40 build-dev/omnimoe bench --device cuda --config $c --warmup 1 \
      --iters 2 --skip-baselines --skip-ceilings > /dev/null 2> $OUT/s15/stages.txt
    echo "stages $c columns $cols rc $?"; grep experts_tiled $OUT/s15/stages.txt | tail -2 | cut -c1-250
  done
done
rm -f $OUT/s15/stages.txt
