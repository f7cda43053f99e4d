#!/usr/bin/env bash
# Planned for the next session (not run): with build-carry/build.tgz = the tree as it is
# (omnimoe + tests) and build-carry/base.tgz = the same omnimoe, time the token sums' pass
# budget with the kept (nested, 3-stage) kernel, and profile the expert sums.
#   - A/B at paper-k512-t16k: default (3 passes), 1024 / 512 / 256 columns per pass.
#   - Stage times of each setting (OMNIMOE_TILED_TIMING=1).
#   - determinism x20 and the pass tests under the sanitizers (change_check.sh).
#   - ncu of expert_sum_kernel's four launches (dW and dV, row and column passes).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib
mkdir -p $OUT/next
DET_REPEAT=20 SANITIZE_FILTER='*ExpertsTiledCudaPasses*' AB_CONFIGS="paper-k512-t16k paper-k512-t4k" \
AB_ENVS="default OMNIMOE_TILED_PASS_COLUMNS=1024 OMNIMOE_TILED_PASS_COLUMNS=512 OMNIMOE_TILED_PASS_COLUMNS=256" \
  timeout 300 bash scripts/device/change_check.sh
for cols in default 1024 512 256; do
  envs=(OMNIMOE_TILED_TIMING=1); [ $cols = default ] || envs+=(OMNIMOE_TILED_PASS_COLUMNS=$cols)
  env "${envs[@]}" timeout 40 build-dev/omnimoe bench --device cuda --config paper-k512-t16k \
    --warmup 1 --iters 2 --skip-baselines --skip-ceilings > /dev/null 2> $OUT/next/stages.txt
  echo "stages t16k columns $cols rc $?"; grep experts_tiled $OUT/next/stages.txt | tail -2 | cut -c1-260
done
OUT=$OUT/next PROF_BIN=build-dev/omnimoe PROF_KERNELS=expert_sum_kernel PROF_LAUNCHES=4 \
  PROF_TIMEOUT=120 bash scripts/device/prof_tiled.sh
