#!/usr/bin/env bash
# Session 16's planned first call (never ran: no device machine was lent that session); call2.sh
# is the second, on the same warm machine. ~350 s. Builds from
# prepare.sh: base = main; split = + gather-split.patch; split-expsum = + expsum160.patch;
# dev (with the tests) = + dot4.patch + split-da.patch (d > 2048 only) + wgmma.patch (a test of
# the wgmma primitives, `WgmmaCuda.*`, in the suite) + dot-wgmma.patch (OMNIMOE_TILED_DOT=wgmma,
# off by default; `ExpertsTiledCudaWgmmaDot.*` force it) + session 17's wgmma-mn.patch (MN-major
# operands, more `WgmmaCuda.*` cases) and wgmma-tokensum.patch (OMNIMOE_TILED_TOKEN_SUM=wgmma,
# off by default; `ExpertsTiledCudaWgmmaTokenSum*` force it). Carry
# build-carry/build.txz, base.txz and variants/.
#   1. change_check: every CUDA test on dev, tiled determinism x5, memcheck + racecheck on the
#      split tests, the tiled pass tests and the split-coefficient test, A/B of the four
#      builds on four configs.
#   2. Per-kernel times of dev at paper-k512-t16k and t1k (which build stages cost what).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib
mkdir -p $OUT/next
DET_REPEAT=5 SANITIZE_TIMEOUT=90 \
SANITIZE_FILTER='*ExpertsCudaGatherSplit*:*ExpertsCudaDeterminism*gather*:*ExpertsTiledCudaPasses*:*SplitCoef*:*Wgmma*' \
AB_CONFIGS="paper-k512-t1k ref-quickstart paper-k512-t16k paper-k512-t4k" AB_ITERS=15 \
  timeout 320 bash scripts/device/change_check.sh
for c in paper-k512-t16k paper-k512-t1k; do
  OUT=$OUT/next timeout 60 bash scripts/device/kernel_times.sh $c | head -40
done
tar czf $OUT/next.tgz -C $OUT next && rm -rf $OUT/next
