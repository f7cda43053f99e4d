#!/usr/bin/env bash
# On a GPU machine whose python3 already has PyTorch, nanobind, scikit-build-core and pytest (the
# lent device machine): pip-installs the package with the CUDA backend into that python3, then
# runs each test file in its own pytest process (a crash in one does not hide the others'
# reports); a file that crashes is run again under cuda-gdb for a native backtrace.
# Logs go to $OUT (or build-python/out).
#   DEVICE_TEST_FILES="test_cuda.py test_errors.py"   which files (default: these and values)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build-python/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) OMP_WAIT_POLICY=passive
{
  nvidia-smi -L
  python3 -c "import torch, nanobind, scikit_build_core, pytest; print('torch', torch.__version__,
torch.version.cuda, 'nanobind', nanobind.__version__, 'skbuild', scikit_build_core.__version__)"
  cmake --version | head -n1
  c++ --version | head -n1
} 2>&1 | tee "$out/env.txt"

start=$(date +%s)
OMNIMOE_PY_VENV=none OMNIMOE_PY_CUDA=ON OMNIMOE_PY_VERBOSE=1 OMNIMOE_PY_BUILD_ONLY=1 \
  ./tests/python/run.sh > "$out/build.log" 2>&1
rc=$?
echo "device_check: build rc=$rc after $(( $(date +%s) - start )) s"
if [ $rc -ne 0 ]; then tail -n 60 "$out/build.log"; exit $rc; fi

status=0
for f in ${DEVICE_TEST_FILES:-test_cuda.py test_errors.py test_values.py}; do
  log="$out/${f%.py}.log"
  python3 -m pytest "tests/python/$f" -rfs -q --tb=short -p no:cacheprovider --durations=8 \
    > "$log" 2>&1
  rc=$?
  echo "device_check: $f rc=$rc"
  tail -n 40 "$log"
  if [ $rc -ge 128 ] && command -v cuda-gdb >/dev/null; then
    echo "device_check: $f crashed; native backtrace:"
    timeout 240 cuda-gdb -batch -ex run -ex bt --args python3 -m pytest "tests/python/$f" -x \
      -q -p no:cacheprovider 2>&1 | grep -v '^\[New Thread\|^\[Thread' | tail -n 40
  fi
  [ $rc -ne 0 ] && status=$rc
done
echo "device_check: done after $(( $(date +%s) - start )) s, status $status"
exit $status
