# ncu summary (speed of light, warp stalls, occupancy, memory) of the tiled path's kernels at one
# config (default paper-k512-t16k, whose forward and backward both run tiled):
# $OUT/tiled_prof_<config>.txt. PROF_KERNELS: regex of kernel names; PROF_LAUNCHES: how many.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib
c=${PROF_CONFIG:-paper-k512-t16k}
bin=${PROF_BIN:-build-dev/omnimoe}
timeout ${PROF_TIMEOUT:-150} ncu --clock-control none \
  -k regex:"${PROF_KERNELS:-dot_kernel|token_sum_kernel|expert_sum_kernel}" \
  --launch-count ${PROF_LAUNCHES:-12} --section SpeedOfLight --section WarpStateStats \
  --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
  --section ComputeWorkloadAnalysis \
  $bin bench --device cuda --config $c --warmup 0 --iters 1 --skip-baselines --skip-ceilings \
  > $OUT/tiled_prof_$c.txt 2>&1
echo "ncu tiled $c rc $?"
