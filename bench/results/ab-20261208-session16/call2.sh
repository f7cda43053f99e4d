#!/usr/bin/env bash
# Session 16's planned second call (after call1.sh, same builds and carry; ~350 s):
#   3. The split count forced (OMNIMOE_GATHER_TOKEN_SPLIT) on the gather configs.
#   4. The dot and the token sums on wgmma (OMNIMOE_TILED_DOT=wgmma, OMNIMOE_TILED_TOKEN_SUM=wgmma:
#      session 17's wgmma-tokensum.patch) against dev's mma.sync; the tiled backward
#      at paper-k512-t4k (forced) on base and dev: does dev move the dispatcher's threshold?
#      The tiled path forced at paper-k4096-t4k (dev, mma.sync and wgmma): how far from dense now.
#   5. The token sums' pass budget (OMNIMOE_TILED_PASS_COLUMNS) at paper-k512-t16k; stage times.
#   6. ncu of base's expert_sum_kernel (four launches), with source counters, and of the
#      router's selection (scripts/device/prof_select.sh).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib
mkdir -p $OUT/next build-dev build-base build-split
[ -x build-dev/omnimoe ] || python3 -m tarfile -e build-carry/build.txz build-dev
[ -x build-base/omnimoe ] || python3 -m tarfile -e build-carry/base.txz build-base
[ -x build-split/omnimoe ] || python3 -m tarfile -e build-carry/variants/split.txz build-split
OUT=$OUT/split AB_BINS=build-split/omnimoe AB_ROUNDS=1 AB_ITERS=15 AB_CONFIGS=paper-k512-t1k \
AB_ENVS="OMNIMOE_GATHER_TOKEN_SPLIT=1 OMNIMOE_GATHER_TOKEN_SPLIT=2 OMNIMOE_GATHER_TOKEN_SPLIT=8" \
  timeout 60 bash scripts/device/ab_bench.sh
OUT=$OUT/split2 AB_BINS=build-split/omnimoe AB_ROUNDS=1 AB_ITERS=15 \
AB_CONFIGS="ref-quickstart pool-1m-k256 paper-k512-t4k" AB_ENVS="OMNIMOE_GATHER_TOKEN_SPLIT=2" \
  timeout 60 bash scripts/device/ab_bench.sh
W=OMNIMOE_TILED_DOT=wgmma,OMNIMOE_TILED_TOKEN_SUM=wgmma
OUT=$OUT/wgmma AB_BINS=build-dev/omnimoe AB_ROUNDS=1 AB_ITERS=10 \
AB_CONFIGS="paper-k512-t4k paper-k512-t16k" \
AB_ENVS="default OMNIMOE_TILED_DOT=wgmma OMNIMOE_TILED_TOKEN_SUM=wgmma $W" \
  timeout 100 bash scripts/device/ab_bench.sh
OUT=$OUT/tiledbwd AB_BINS="build-base/omnimoe build-dev/omnimoe" AB_ROUNDS=1 AB_ITERS=10 \
AB_CONFIGS=paper-k512-t4k AB_ENVS="OMNIMOE_EXPERTS_PATH=tiled" timeout 60 bash scripts/device/ab_bench.sh
# How far the tiled path (dev's kernels, mma.sync and wgmma dots) is from dense at K = 4096.
OUT=$OUT/k4096 AB_BINS=build-dev/omnimoe AB_ROUNDS=1 AB_ITERS=5 AB_CONFIGS=paper-k4096-t4k \
AB_ENVS="OMNIMOE_EXPERTS_PATH=tiled $W,OMNIMOE_EXPERTS_PATH=tiled" \
  timeout 80 bash scripts/device/ab_bench.sh
OUT=$OUT/pass AB_BINS=build-dev/omnimoe AB_ROUNDS=1 AB_ITERS=10 AB_CONFIGS=paper-k512-t16k \
AB_ENVS="OMNIMOE_TILED_PASS_COLUMNS=1024 OMNIMOE_TILED_PASS_COLUMNS=512" \
  timeout 60 bash scripts/device/ab_bench.sh
for run in base dev dev-wgmma; do
  b=build-${run%-wgmma}; envs=(OMNIMOE_TILED_TIMING=1)
  [ $run = dev-wgmma ] && envs+=(OMNIMOE_TILED_DOT=wgmma OMNIMOE_TILED_TOKEN_SUM=wgmma)
  env "${envs[@]}" timeout 40 $b/omnimoe bench --device cuda --config paper-k512-t16k \
    --warmup 1 --iters 2 --skip-baselines --skip-ceilings > /dev/null 2> $OUT/next/stages-$run.txt
  echo "stages t16k $run rc $?"; grep experts_tiled $OUT/next/stages-$run.txt | tail -2 | cut -c1-300
done
timeout 100 ncu --clock-control none -k regex:expert_sum_kernel --launch-count 4 \
  --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
  --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SchedulerStats \
  --section InstructionStats --section SourceCounters \
  build-base/omnimoe bench --device cuda --config paper-k512-t16k --warmup 0 --iters 1 \
  --skip-baselines --skip-ceilings > $OUT/next/prof_expert_sum.txt 2>&1
echo "ncu expert_sum rc $?"
grep -E "Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput|Memory Throughput|L2 Hit|Stall|Issue Slots Busy" \
  $OUT/next/prof_expert_sum.txt | head -40
# The selection at paper-k4096-t4k and t16k, line by line (0.50 and 0.75 ms: the next lever
# outside the experts).
OUT=$OUT/next timeout 200 bash scripts/device/prof_select.sh
tar czf $OUT/next.tgz -C $OUT next && rm -rf $OUT/next
