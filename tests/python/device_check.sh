#!/usr/bin/env bash
# On a GPU machine whose python3 already has PyTorch, nanobind, scikit-build-core and pytest (the
# lent device machine): pip-installs the package with the CUDA backend into that python3, runs
# binding_error_repro.py's cases (errors raised by the library and by the binding, each in its
# own process), then each test file in its own pytest process (a crash in one does not hide the
# others' reports). The first process that crashes is run again under cuda-gdb: the top frames
# of its native backtrace, the faulting instruction and the loaded unwinders go to the log.
# The logs are packed into one file, $OUT/python_logs.tar.gz (OUT defaults to build-python/out).
#   DEVICE_TEST_FILES="test_cuda.py test_errors.py"   which files (default: every test file)
#   DEVICE_GDB_ALL=1                                   a backtrace for every crash, not the first
#   DEVICE_SKIP_BUILD=1                                the package is already installed
set -uo pipefail
cd "$(dirname "$0")/../.."
dest=${OUT:-build-python/out}
out=$(mktemp -d)
mkdir -p "$dest"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) OMP_WAIT_POLICY=passive
{
  nvidia-smi -L
  python3 -c "import sys, torch, nanobind, scikit_build_core, pytest; print(sys.version.split()[0],
'torch', torch.__version__, torch.version.cuda, 'nanobind', nanobind.__version__,
'skbuild', scikit_build_core.__version__)"
  cmake --version | head -n1
  c++ --version | head -n1
  ld --version | head -n1
  # Whether the toolchain links libstdc++ statically into shared objects (the H100 image did).
  echo "CXX=${CXX:-} c++=$(command -v c++) libstdc++.so: $(c++ -print-file-name=libstdc++.so)"
} 2>&1 | tee "$out/env.txt"

pack() { tar -czf "$dest/python_logs.tar.gz" -C "$out" . ; }

start=$(date +%s)
rc=0
if [ "${DEVICE_SKIP_BUILD:-0}" != 1 ]; then
  OMNIMOE_PY_VENV=none OMNIMOE_PY_CUDA=ON OMNIMOE_PY_VERBOSE=1 OMNIMOE_PY_BUILD_ONLY=1 \
    ./tests/python/run.sh > "$out/build.log" 2>&1
  rc=$?
fi
echo "device_check: build rc=$rc after $(( $(date +%s) - start )) s"
if [ $rc -ne 0 ]; then tail -n 60 "$out/build.log"; pack; exit $rc; fi
so=$(python3 -c "import omnimoe._omnimoe as m; print(m.__file__)")
{ echo "$so"; ls -l "$so"; readelf -d "$so" | grep -E 'NEEDED|RPATH|RUNPATH'
  echo "exported symbols: $(nm -D --defined-only "$so" | wc -l)"
  python3 -c "import omnimoe; print('cuda_available', omnimoe.cuda_available())"; } \
  > "$out/extension.txt" 2>&1
cat "$out/extension.txt"

gdb_done=0
# A native backtrace of a crashing command: the top frames (where it crashed) first.
backtrace() {
  local log=$1; shift
  if [ $gdb_done = 1 ] && [ "${DEVICE_GDB_ALL:-0}" != 1 ]; then return; fi
  command -v cuda-gdb >/dev/null || { echo "device_check: no cuda-gdb"; return; }
  gdb_done=1
  timeout 200 cuda-gdb -batch -ex "set pagination off" -ex "set print thread-events off" \
    -ex run -ex "bt 30" -ex "info symbol \$pc" -ex "x/8i \$pc" -ex "info registers" \
    -ex "p \$_siginfo._sifields._sigfault.si_addr" -ex "info proc mappings" \
    --args "$@" > "$log" 2>&1
  echo "device_check: cuda-gdb -> $(basename "$log"); its top frames:"
  grep -E '^#|signal|SIG' "$log" | head -n 36
  echo "device_check: unwinders and C++ runtimes mapped:"
  grep -oE '/[^ ]*(gcc_s|stdc\+\+|unwind|cublasLt|_omnimoe)[^ ]*' "$log" | sort -u
}

status=0
cases=$(python3 tests/python/binding_error_repro.py --list)
for c in $cases "binding_layer_args --no-cuda-init"; do
  name=${c// --no-cuda-init/_no_cuda_init}
  python3 tests/python/binding_error_repro.py $c > "$out/repro_$name.log" 2>&1
  rc=$?
  echo "device_check: repro $name rc=$rc: $(grep -m1 -E 'omnimoe.Error|no error|Fatal' \
    "$out/repro_$name.log")"
  if [ $rc -ne 0 ]; then
    status=$rc
    [ $rc -ge 128 ] && backtrace "$out/gdb_repro_$name.log" python3 \
      tests/python/binding_error_repro.py $c
  fi
done

files=${DEVICE_TEST_FILES:-$(cd tests/python && ls test_*.py)}
for f in $files; do
  log="$out/${f%.py}.log"
  python3 -m pytest "tests/python/$f" -rfs -q --tb=short -p no:cacheprovider --durations=8 \
    > "$log" 2>&1
  rc=$?
  echo "device_check: $f rc=$rc: $(grep -E ' in [0-9.]+s' "$log" | tail -n1)"
  if [ $rc -ne 0 ]; then
    grep -E '^(FAILED|ERROR)|Error|assert' "$log" | head -n 20
    [ $rc -ge 128 ] && backtrace "$out/gdb_${f%.py}.log" python3 -m pytest "tests/python/$f" \
      -x -q -p no:cacheprovider
    status=$rc
  fi
done
echo "device_check: done after $(( $(date +%s) - start )) s, status $status"
pack
exit $status
