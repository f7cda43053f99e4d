#!/usr/bin/env bash
# Packs binaries built on the CPU machine for a device call (building there would spend device
# time; scripts/device/change_check.sh unpacks them):
#   pack_builds.sh dev [DIR]           build-carry/build.tgz: omnimoe + tests/omnimoe_cuda_tests
#   pack_builds.sh base [DIR]          build-carry/base.tgz: omnimoe
#   pack_builds.sh variant NAME [DIR]  build-carry/variants/NAME.txz: omnimoe (xz, ~9 MB)
# DIR is a Release build (default build-lead: `cmake -S . -B build-lead -G Ninja
# -DCMAKE_BUILD_TYPE=Release && ninja -C build-lead omnimoe_cuda_tests omnimoe_tool`). The
# binaries are stripped; carry build-carry/ (64 MiB in all) with the call.
set -euo pipefail
kind=${1:?usage: pack_builds.sh dev|base|variant NAME [DIR]}
name=""
if [ "$kind" = variant ]; then name=${2:?variant needs a NAME}; shift; fi
dir=${2:-build-lead}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p build-carry/variants "$stage/tests"
cp "$dir/omnimoe" "$stage/" && strip "$stage/omnimoe"
case "$kind" in
  dev)
    cp "$dir/tests/omnimoe_cuda_tests" "$stage/tests/" && strip "$stage/tests/omnimoe_cuda_tests"
    tar czf build-carry/build.tgz -C "$stage" omnimoe tests ;;
  base) tar czf build-carry/base.tgz -C "$stage" omnimoe ;;
  variant)
    (cd "$stage" && python3 -m tarfile -c "$OLDPWD/build-carry/variants/$name.txz" omnimoe) ;;
  *) echo "pack_builds.sh: unknown kind '$kind' (dev, base or variant)" >&2; exit 2 ;;
esac
shopt -s nullglob
du -b build-carry/*.tgz build-carry/variants/*.txz |
  awk '{s += $1; print} END {printf "%.1f MiB in all\n", s / 1048576}'
