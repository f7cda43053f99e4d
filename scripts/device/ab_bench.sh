#!/usr/bin/env bash
# A/B of one config under environment settings, same build and card, interleaved so drift
# shows: AB_CONFIG (default ref-quickstart), AB_ENVS ("" = the default build's behaviour;
# entries like OMNIMOE_ROUTER_WARP_CTAS=4), AB_ROUNDS. JSON per run under $OUT/ab/.
set -uo pipefail
O="${OUT:-/tmp/omnimoe_out}/ab"
mkdir -p "$O"
config=${AB_CONFIG:-ref-quickstart}
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  i=0
  for e in ${AB_ENVS:-default}; do
    i=$((i + 1))
    envs=(); [ "$e" = default ] || envs=("$e")
    env "${envs[@]}" timeout 90 ./build-dev/omnimoe bench --device cuda --config "$config" \
      --warmup 5 --iters 30 --json "$O/$config-$i-r$round.json" > "$O/$config-$i-r$round.txt" 2>&1
    echo "ab $e round $round: rc $?"
    grep -E "^  (layer|router|experts)" "$O/$config-$i-r$round.txt" | cut -c1-60 | sed "s/^/  [$e r$round] /"
  done
done
