#!/usr/bin/env bash
# How many SMs the layer's MLP should leave to the expert branch running beside it: builds,
# runs the GEMM and layer tests, then times the layer rows of the given configs (default
# ref-quickstart and pool-1m-k16) for each OMNIMOE_EXPERT_BRANCH_SMS in $SMS_LIST.
# Logs in $OUT/branch_sms.tgz.
set -uo pipefail
final_out=${OUT:-/tmp/omnimoe_out}
O="$final_out/branch_sms"
mkdir -p "$O"
trap 'tar czf "$final_out/branch_sms.tgz" -C "$final_out" branch_sms && rm -rf "$O"' EXIT
if ! { cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release &&
       ninja -C build-dev -j16 omnimoe_tool omnimoe_cuda_tests; } > "$O/build.log" 2>&1; then
  grep -E "error|FAILED" "$O/build.log" | head -30; exit 1
fi
timeout 120 ./build-dev/tests/omnimoe_cuda_tests --gtest_brief=1 \
  --gtest_filter='*GemmCuda*:*LayerCuda*:*LayerOverlapCuda*' > "$O/tests.log" 2>&1
echo "tests: rc $?"; grep -E "^\[  FAILED|PASSED|SKIPPED \]" "$O/tests.log" | head -20
if [ "$#" -gt 0 ]; then configs=("$@"); else configs=(ref-quickstart pool-1m-k16); fi
for c in "${configs[@]}"; do
  for sms in ${SMS_LIST:-0 8 16 24 32 48}; do
    OMNIMOE_EXPERT_BRANCH_SMS=$sms timeout 100 ./build-dev/omnimoe bench --device cuda \
      --config "$c" --warmup 5 --iters 30 --skip-baselines > "$O/$c-$sms.txt" 2>/dev/null
    echo "$c sms=$sms: $(grep -E '^  layer forward ' "$O/$c-$sms.txt" | awk '{print $3}') fwd," \
         "$(grep -E '^  layer forward\+backward' "$O/$c-$sms.txt" | awk '{print $3}') fwd+bwd"
  done
done
grep -E "^  (router|experts|MLP|schedule)" "$O/${configs[0]}-0.txt"
