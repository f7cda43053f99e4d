#!/usr/bin/env bash
# The router's open questions on the device: its tests, then its timing test under each variant
# of the warp selection (OMNIMOE_ROUTER_WARP_CTAS=4|5|6 register caps, OMNIMOE_ROUTER_FORWARD=
# unfused), sanitizers on small cases of the new kernels, and ncu per kernel at pool-1m-k16.
# At f001680 the bench's selection at pool-1m-k16 took 0.055 ms (default: 6 CTAs)
# against 0.028 ms for an earlier version of the kernel (4 CTAs) on the same card: this decides
# the default. ptxas reports spills in the 32-items-per-lane warp kernels (axes of 513-1024,
# pool-1m): fused and 16-byte rows 60/84 bytes at 6 CTAs, 48/64 at 5, 28/28 at 4; the unfused
# 16-byte kernel at 6 CTAs does not spill. Logs in $OUT/router.tgz.
set -u
L=${OUT:-/tmp/omnimoe_out}/router
mkdir -p "$L"
trap 'tar czf "$L/../router.tgz" -C "$L/.." router' EXIT
t0=$(date +%s); since() { echo "[$(( $(date +%s) - t0 )) s]"; }
(cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release &&
 ninja -C build-dev -j16 omnimoe_cuda_tests) > "$L/build.log" 2>&1 ||
  { grep -E "error|FAILED" "$L/build.log" | head -20; exit 1; }
B=build-dev/tests/omnimoe_cuda_tests
summary() { grep -E "^\[  FAILED|^\[  PASSED|Failure$|Expected|Which is" "$1" | head -25; }
timeout 150 $B --gtest_filter='*RouterCuda*:*ScheduleCuda*:*LayerCuda*' --gtest_brief=1 \
  > "$L/tests.log" 2>&1
echo "tests rc $? $(since)"; summary "$L/tests.log"
OMNIMOE_ROUTER_FORWARD=unfused OMNIMOE_ROUTER_WARP_CTAS=4 timeout 60 $B --gtest_brief=1 \
  --gtest_filter='*RouterCudaSelect*:*RouterCudaForward*' > "$L/tests_variants.log" 2>&1
echo "variant tests (unfused, 4 CTAs) rc $? $(since)"; summary "$L/tests_variants.log"
T='--gtest_also_run_disabled_tests --gtest_filter=*RouterCudaTiming*'
timing() {
  echo "== $1"; shift
  env "$@" timeout 40 $B $T > "$L/t.log" 2>&1; grep -E "^pool|^paper" "$L/t.log"
  cat "$L/t.log" >> "$L/timing.log"
}
timing "default (fused, 6 CTAs)" X=1
timing "4 CTAs" OMNIMOE_ROUTER_WARP_CTAS=4
timing "5 CTAs" OMNIMOE_ROUTER_WARP_CTAS=5
timing "unfused forward" OMNIMOE_ROUTER_FORWARD=unfused
timing "default, again" X=1
S='*RouterCudaSelectTies.MixedTokens*:*RouterCudaSelectTies.ConstantLogp*:*RouterCudaForwardNonFinite.*Nr256*:*RouterCudaForward.MatchesCpu/f32_T130*:*RouterCudaBackward.MatchesCpu/f32_T300*'
for t in memcheck racecheck; do
  timeout 80 compute-sanitizer --tool $t --error-exitcode 9 $B --gtest_filter="$S" \
    > "$L/$t.log" 2>&1
  echo "$t rc $? $(since)"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$L/$t.log" | tail -1
done
export OMNIMOE_ROUTER_TIMING_SHAPE=pool-1m-k16 OMNIMOE_ROUTER_TIMING_ITERS=2
timeout 60 ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
  $B $T > "$L/ncu_kernels.log" 2>&1
echo "ncu rc $? $(since)"
