set -u
S=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > $OUT/gpu.txt 2>&1
cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DOMNIMOE_TOOL=OFF > $OUT/build.log 2>&1 && ninja -C build-dev -j16 tests/omnimoe_cuda_tests >> $OUT/build.log 2>&1 || { tail -40 $OUT/build.log; exit 1; }
B=./build-dev/tests/omnimoe_cuda_tests
$B --gtest_filter='Cases/GemmCuda.*:Cases/MlpCuda.*:GemmCuda*:MlpCuda*' > $OUT/tests.log 2>&1; grep -E "FAILED|PASSED|SKIPPED|Failure|worst|error" $OUT/tests.log | head -60
$B --gtest_also_run_disabled_tests --gtest_filter='*MlpCudaTiming*' > $OUT/timing.log 2>&1; grep -E "gemm|mlp_|FAIL|OK" $OUT/timing.log
F='Cases/MlpCuda.*/bf16_T257_d37_I53:Cases/MlpCuda.*/f32_T64_d1_I1_pad1:Cases/MlpCuda.*/bf16_T300_d128_I256_accumulate:Cases/GemmCuda.*/bf16_NN_m37_n53_k129_beta0:GemmCudaEmpty*:MlpCudaEmpty*'
timeout 150 $S --tool memcheck --leak-check no $B --gtest_filter="$F" > $OUT/memcheck.log 2>&1; tail -4 $OUT/memcheck.log
timeout 60 $S --tool racecheck $B --gtest_filter='Cases/MlpCuda.*/bf16_T300_d128_I256_accumulate' > $OUT/racecheck.log 2>&1; tail -3 $OUT/racecheck.log
