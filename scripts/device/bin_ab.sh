#!/usr/bin/env bash
# A/B of two builds on the same card, interleaved so drift shows: each of AB_CONFIGS (default
# paper-k4096-t4k) with AB_BINS (default "build-base/omnimoe build-dev/omnimoe"), AB_ROUNDS
# rounds (default 2), no baselines or ceilings. Prints AB_ROWS (a regex of row names, default
# the router and layer rows); the whole outputs land in $OUT/bin_ab/.
set -uo pipefail
O="${OUT:-/tmp/omnimoe_out}/bin_ab"  # under the caller's OUT
mkdir -p "$O"
rows=${AB_ROWS:-"^  (layer forward |router|layer forward\+backward )"}
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for c in ${AB_CONFIGS:-paper-k4096-t4k}; do
    for b in ${AB_BINS:-build-base/omnimoe build-dev/omnimoe}; do
      tag=$(basename "$(dirname "$b")")
      timeout 120 "$b" bench --device cuda --config "$c" --warmup 3 --iters 15 --skip-baselines \
        --skip-ceilings > "$O/$c-$tag-r$round.txt" 2>&1
      echo "$c $tag r$round: rc $?"
      grep -E "$rows" "$O/$c-$tag-r$round.txt" | cut -c1-60 | sed "s/^/  /"
    done
  done
done
