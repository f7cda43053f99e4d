# Device check of the CUDA experts ops (run from the repository root on the device machine):
# build, the experts and layer tests, compute-sanitizer on small cases, then the timing table.
set -u
S=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > $OUT/gpu.txt 2>&1
cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DOMNIMOE_TOOL=ON > $OUT/build.log 2>&1 && ninja -C build-dev -j16 tests/omnimoe_cuda_tests >> $OUT/build.log 2>&1 || { tail -40 $OUT/build.log; exit 1; }
B=./build-dev/tests/omnimoe_cuda_tests
$B --gtest_filter='*ExpertsCuda*:*LayerCuda*' > $OUT/tests.log 2>&1; grep -E "FAILED|PASSED|Failure|worst|error|differs" $OUT/tests.log | head -50
F='Cases/ExpertsCuda.*/bf16_T257_d64_Nr19_Nc23_K7_silu_random_gather:Cases/ExpertsCuda.*/f32_T21_d1031*gather:Cases/ExpertsCuda.*/f16_T17_d6000*:Cases/ExpertsCuda.*/f64_T9_d2100*:Cases/ExpertsCuda.*/bf16_T64_d1024*:ExpertsCudaEdge*'
[ -z "${SKIP_SANITIZER:-}" ] && timeout 200 $S --tool memcheck --leak-check no $B --gtest_filter="$F" > $OUT/memcheck.log 2>&1; tail -3 $OUT/memcheck.log
[ -z "${SKIP_SANITIZER:-}" ] && timeout 100 $S --tool racecheck $B --gtest_filter='Cases/ExpertsCuda.ForwardMatchesCpu/bf16_T64_d1024*gather:Cases/ExpertsCuda.BackwardMatchesCpu/bf16_T64_d1024*gather:Cases/ExpertsCuda.*/bf16_T33_d3000*gather:Cases/ExpertsCuda.BackwardMatchesCpu/f64_T9_d2100*' > $OUT/racecheck.log 2>&1; tail -3 $OUT/racecheck.log
[ -z "${SKIP_TIMING:-}" ] && OMNIMOE_TIMING_SHAPE=${OMNIMOE_TIMING_SHAPE:-} timeout 220 $B --gtest_also_run_disabled_tests --gtest_filter='*ExpertsCudaTiming*' > $OUT/timing.log 2>&1; grep -E "device|m=|default|FAIL" $OUT/timing.log
# The layer at the pool shapes through the bench tool (someone else's; skipped if it does not build).
if [ -z "${SKIP_BENCH:-}" ] && ninja -C build-dev -j16 omnimoe_tool >> $OUT/build.log 2>&1; then
  for c in pool-1m-k16 pool-1m-k256; do timeout 100 ./build-dev/omnimoe bench --config $c --skip-baselines --iters 10 > $OUT/bench-$c.txt 2>&1; cat $OUT/bench-$c.txt | tail -30; done
fi
