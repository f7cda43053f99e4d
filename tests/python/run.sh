#!/usr/bin/env bash
# Builds the omnimoe Python package with pip (scikit-build-core over the project's CMake), installs
# it into a virtual environment under build-python/, and runs the Python tests.
#
# The environment sees the system's site-packages, so a machine that already has PyTorch uses it;
# elsewhere what is missing comes from PyPI (PyTorch's wheel is about 3 GB with its CUDA
# libraries: a first run takes a minute or two to install it). Later runs reuse the environment
# and the CMake build folder.
#
#   OMNIMOE_PY_CUDA=ON|OFF|auto  build the CUDA backend into the extension (auto: when a GPU is
#                                visible; a CPU-only machine need not compile kernels)
#   OMNIMOE_PY_VENV=DIR|none     the environment (default build-python/venv); none installs into
#                                the running python3's own (e.g. an existing virtualenv)
#   PYTEST_TARGETS="tests/python/test_cuda.py"   what pytest runs (default tests/python)
#   PYTEST_ARGS="-k values"      extra pytest arguments
#   OMNIMOE_PY_VERBOSE=1         show the build's output
#   OMNIMOE_PY_BUILD_ONLY=1      build and install, run no test
set -euo pipefail
cd "$(dirname "$0")/../.."

python=${PYTHON:-python3}
venv=${OMNIMOE_PY_VENV:-build-python/venv}
if [ "$venv" = none ]; then
  py=$python
else
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv --system-site-packages "$venv"
  fi
  py="$venv/bin/python"
fi

if ! "$py" -c "import torch, pytest, nanobind, scikit_build_core" 2>/dev/null; then
  "$py" -m pip install --quiet --disable-pip-version-check \
    "torch>=2.4" pytest "nanobind>=2.0" "scikit-build-core>=0.10"
fi

cuda=${OMNIMOE_PY_CUDA:-auto}
if [ "$cuda" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    cuda=ON
  else
    cuda=OFF
  fi
fi

quiet=--quiet
[ "${OMNIMOE_PY_VERBOSE:-0}" = 1 ] && quiet=--verbose
echo "omnimoe python: building the extension (CUDA backend $cuda)"
"$py" -m pip install $quiet --disable-pip-version-check --no-build-isolation --no-deps \
  -C build-dir=build-python/cmake -C cmake.define.OMNIMOE_CUDA="$cuda" .

[ "${OMNIMOE_PY_BUILD_ONLY:-0}" = 1 ] && exit 0

# The installed package (with its extension) is the one imported: the sources under python/
# are not on the path.
exec "$py" -m pytest ${PYTEST_TARGETS:-tests/python} -rs -q -p no:cacheprovider ${PYTEST_ARGS:-}
