#!/usr/bin/env bash
# A kernel timeline of one bench config (every kernel's start, end and stream, from CUPTI through
# kernel_trace.cpp), for seeing how the layer's branches overlap; scripts/trace_report.py reads
# it. Needs build-dev (session_check.sh builds it). Usage: scripts/device/kernel_trace.sh CONFIG
# Output: $OUT/trace_CONFIG.csv
set -u
c=${1:-ref-quickstart}
o=${OUT:-/tmp/omnimoe_out}
mkdir -p "$o" build-dev
cuda=$(dirname "$(dirname "$(command -v nvcc)")")
lib=build-dev/libkernel_trace.so
if [ ! -f "$lib" ]; then
  g++ -O2 -shared -fPIC -I"$cuda/include" -I"$cuda/extras/CUPTI/include" \
    scripts/device/kernel_trace.cpp -L"$cuda/lib64" -L"$cuda/extras/CUPTI/lib64" -lcupti \
    -Wl,-rpath,"$cuda/lib64:$cuda/extras/CUPTI/lib64" -o "$lib" || exit 1
fi
CUDA_INJECTION64_PATH=$PWD/$lib OMNIMOE_TRACE_CSV="$o/trace_$c.csv" timeout 120 \
  ./build-dev/omnimoe bench --device cuda --config "$c" --warmup 3 --iters 10 --skip-baselines \
  --skip-ceilings > "$o/trace_$c.txt" 2>&1
echo "kernel trace $c: rc $?, $(wc -l < "$o/trace_$c.csv") kernels"
