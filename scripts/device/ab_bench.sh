#!/usr/bin/env bash
# A/B on one card, interleaved so drift shows: every config of AB_CONFIGS (default AB_CONFIG,
# else ref-quickstart) with every build of AB_BINS (default AB_BIN, else ./build-dev/omnimoe;
# e.g. "build-base/omnimoe build-dev/omnimoe") under every setting of AB_ENVS (space-separated;
# `default` sets nothing; entries like OMNIMOE_ROUTER_WARP_CTAS=4, or several joined by commas,
# A=1,B=2), AB_ROUNDS rounds (default 2) of AB_ITERS timed runs (default 30). Prints the
# layer, router and experts rows; the runs' text and JSON are packed into $OUT/ab.tgz (the device
# tool returns only a few files per call).
set -uo pipefail
final_out=${OUT:-/tmp/omnimoe_out}
O="$final_out/ab"
mkdir -p "$O"
trap 'tar czf "$final_out/ab.tgz" -C "$final_out" ab && rm -rf "$O"' EXIT
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for config in ${AB_CONFIGS:-${AB_CONFIG:-ref-quickstart}}; do
    for bin in ${AB_BINS:-${AB_BIN:-./build-dev/omnimoe}}; do
      build=$(basename "$(dirname "$bin")")
      i=0
      for e in ${AB_ENVS:-default}; do
        i=$((i + 1))
        envs=(); [ "$e" = default ] || IFS=, read -ra envs <<< "$e"
        run="$O/$config-$build-$i-r$round"
        env "${envs[@]}" timeout 120 "$bin" bench --device cuda --config "$config" --warmup 5 \
          --iters "${AB_ITERS:-30}" --json "$run.json" > "$run.txt" 2>&1
        echo "ab $config $build $e round $round: rc $?"
        grep -E "^  (layer|router|experts)" "$run.txt" | cut -c1-62 | sed "s/^/  [$build $e r$round] /"
      done
    done
  done
done
