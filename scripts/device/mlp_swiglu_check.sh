#!/usr/bin/env bash
# One device call for the MLP's SwiGLU executions: build, the MLP / layer / GEMM CUDA tests,
# memcheck and racecheck on small fused cases, then the ref-quickstart bench with the fused
# products (the default on sm_90) and with OMNIMOE_MLP_SWIGLU=separate, in the same run.
# Needs .deps carried (googletest and cutlass). Everything lands in $OUT/mlp.tgz.
set -uo pipefail
final_out=${OUT:-/tmp/omnimoe_out}
O="$final_out/mlp"
mkdir -p "$O/json"
trap 'tar czf "$final_out/mlp.tgz" -C "$final_out" mlp && rm -rf "$O"' EXIT
start=$(date +%s)
since() { echo $(( $(date +%s) - start )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$O/gpu.txt"
if ! { cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
         -DOMNIMOE_GIT_COMMIT="${OMNIMOE_GIT_COMMIT:-unknown}" &&
       ninja -C build-dev -j16 omnimoe_cuda_tests omnimoe_tool; } > "$O/build.log" 2>&1; then
  grep -E "error|FAILED" "$O/build.log" | head -30; exit 1
fi
grep -iE "cutlass|spill" "$O/build.log" | head -5
echo "build: $(since) s"
bin=./build-dev/tests/omnimoe_cuda_tests
timeout 150 $bin --gtest_brief=1 --gtest_filter="${TEST_FILTER:-*Mlp*:*Layer*:*Gemm*}" \
  > "$O/cuda_tests.log" 2>&1
echo "cuda tests: rc $? at $(since) s"
grep -E "^\[  FAILED|^\[  PASSED|SKIPPED \]|tests ran" "$O/cuda_tests.log" | head -30
small="${SANITIZE_FILTER:-*MlpCuda.*/f16_T257_d64_I136*:*MlpCuda.*/bf16_T1_d64*}"
for t in memcheck racecheck; do
  timeout 90 compute-sanitizer --tool $t --error-exitcode 9 $bin --gtest_filter="$small" \
    --gtest_brief=1 > "$O/sanitizer_$t.log" 2>&1
  echo "compute-sanitizer $t: rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$O/sanitizer_$t.log" | tail -1) at $(since) s"
done
for swiglu in fused separate; do
  for c in ${BENCH:-ref-quickstart}; do
    OMNIMOE_MLP_SWIGLU=$swiglu timeout 90 ./build-dev/omnimoe bench --device cuda --config "$c" \
      --warmup 5 --iters 20 --json "$O/json/$c-$swiglu.json" > "$O/bench-$c-$swiglu.txt" 2>&1
    echo "bench $c ($swiglu): rc $? at $(since) s"
    grep -E "^  (layer|MLP)|ceiling|copy|GEMM" "$O/bench-$c-$swiglu.txt" | cut -c1-100 | head -14
  done
done
