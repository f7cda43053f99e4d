#!/usr/bin/env bash
# A/B of one config under environment settings, same build and card, interleaved so drift
# shows: AB_CONFIG (default ref-quickstart), AB_ENVS (space-separated; `default` sets nothing;
# entries like OMNIMOE_ROUTER_WARP_CTAS=4), AB_ROUNDS, AB_BIN (default ./build-dev/omnimoe). The runs' text and JSON are packed into
# $OUT/ab.tgz (the device tool returns only a few files per call).
set -uo pipefail
final_out=${OUT:-/tmp/omnimoe_out}
O="$final_out/ab"
mkdir -p "$O"
trap 'tar czf "$final_out/ab.tgz" -C "$final_out" ab && rm -rf "$O"' EXIT
config=${AB_CONFIG:-ref-quickstart}
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  i=0
  for e in ${AB_ENVS:-default}; do
    i=$((i + 1))
    envs=(); [ "$e" = default ] || envs=("$e")
    env "${envs[@]}" timeout 90 "${AB_BIN:-./build-dev/omnimoe}" bench --device cuda --config "$config" \
      --warmup 5 --iters 30 --json "$O/$config-$i-r$round.json" > "$O/$config-$i-r$round.txt" 2>&1
    echo "ab $e round $round: rc $?"
    grep -E "^  (layer|router|experts)" "$O/$config-$i-r$round.txt" | cut -c1-62 | sed "s/^/  [$e r$round] /"
  done
done
