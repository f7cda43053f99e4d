#!/usr/bin/env bash
# Packs binaries built on the CPU machine for a device call (building there would spend device
# time; scripts/device/change_check.sh unpacks them):
#   pack_builds.sh dev [DIR]           build-carry/build.txz: omnimoe + tests/omnimoe_cuda_tests
#   pack_builds.sh base [DIR]          build-carry/base.txz: omnimoe
#   pack_builds.sh variant NAME [DIR]  build-carry/variants/NAME.txz: omnimoe
# DIR is a Release build (default build-lead: `cmake -S . -B build-lead -G Ninja
# -DCMAKE_BUILD_TYPE=Release && ninja -C build-lead omnimoe_cuda_tests omnimoe_tool`). The
# binaries are stripped and packed with xz's 64 MiB window (preset 9), which finds the two
# binaries of dev alike: ~11 MB for both, against 33 MB gzipped. Unpack with
# `python3 -m tarfile -e` (the device may lack xz). The tree and the carried paths together must
# stay under 64 MiB.
set -euo pipefail
kind=${1:?usage: pack_builds.sh dev|base|variant NAME [DIR]}
name=""
if [ "$kind" = variant ]; then name=${2:?variant needs a NAME}; shift; fi
dir=${2:-build-lead}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p build-carry/variants "$stage/tests"
rm -f build-carry/*.tgz  # gzip packs of earlier sessions
# pack OUT NAME...: the staged NAMEs into OUT (relative to the repository root).
pack() {
  local out=$1
  shift
  (cd "$stage" && python3 -c 'import sys, tarfile
with tarfile.open(sys.argv[1], "w:xz", preset=9) as t:
    for name in sys.argv[2:]:
        t.add(name)' "$OLDPWD/$out" "$@")
}
cp "$dir/omnimoe" "$stage/" && strip "$stage/omnimoe"
case "$kind" in
  dev)
    cp "$dir/tests/omnimoe_cuda_tests" "$stage/tests/" && strip "$stage/tests/omnimoe_cuda_tests"
    pack build-carry/build.txz omnimoe tests ;;
  base) pack build-carry/base.txz omnimoe ;;
  variant) pack "build-carry/variants/$name.txz" omnimoe ;;
  *) echo "pack_builds.sh: unknown kind '$kind' (dev, base or variant)" >&2; exit 2 ;;
esac
shopt -s nullglob
du -b build-carry/*.txz build-carry/variants/*.txz |
  awk '{s += $1; print} END {printf "%.1f MiB in all\n", s / 1048576}'
