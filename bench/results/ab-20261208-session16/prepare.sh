#!/usr/bin/env bash
# Builds the four binaries call1.sh compares, on the CPU machine, from a clean main (run from
# the repository root; ~15 min: dot-wgmma.patch changes a header every CUDA file includes):
#   base                 main as it is
#   split                + gather-split.patch (a token's experts dealt to several thread groups)
#   split-expsum         + expsum160.patch (expert sums in blocks of 160 slots, two per SM)
#   dev (with the tests) + dot4.patch (dot products in 4 stages) + split-da.patch (the tiled
#                        path up to d = 8192: dW's coefficients in two parts above d = 2048;
#                        no effect on the benched configs, d = 1024) + wgmma.patch (the
#                        wgmma primitives and their test) + dot-wgmma.patch (the dot
#                        products on wgmma behind OMNIMOE_TILED_DOT=wgmma, off by default)
#                        + wgmma-mn.patch (session 17: MN-major operands and m64n128k16,
#                        tested on their own) + wgmma-tokensum.patch (session 17: the token
#                        sums on wgmma behind OMNIMOE_TILED_TOKEN_SUM=wgmma, off by default)
# Leaves the eight patches applied (the dev tree) and build-carry/ ready to carry.
set -euo pipefail
D=bench/results/ab-20261208-session16
git diff --quiet -- src tests || { echo "prepare.sh: src/ or tests/ has changes; start from main" >&2; exit 1; }
[ -f build-lead/build.ninja ] || cmake -S . -B build-lead -G Ninja -DCMAKE_BUILD_TYPE=Release
rm -f build-carry/variants/*.txz
ninja -C build-lead omnimoe && bash scripts/device/pack_builds.sh base
git apply $D/gather-split.patch && ninja -C build-lead omnimoe && bash scripts/device/pack_builds.sh variant split
git apply $D/expsum160.patch && ninja -C build-lead omnimoe && bash scripts/device/pack_builds.sh variant split-expsum
git apply $D/dot4.patch $D/split-da.patch $D/wgmma.patch $D/dot-wgmma.patch $D/wgmma-mn.patch \
  $D/wgmma-tokensum.patch
ninja -C build-lead omnimoe_cuda_tests omnimoe_tool && bash scripts/device/pack_builds.sh dev
