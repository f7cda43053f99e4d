#!/usr/bin/env bash
# Installs the build and test dependencies that are missing, with apt-get (Debian, Ubuntu).
# Idempotent: when everything is there it installs nothing and needs no network or root.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
have() { command -v "$1" >/dev/null 2>&1; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

have cmake || missing+=(cmake)
have ninja || missing+=(ninja-build)
have g++ || missing+=(g++)
have git || missing+=(git)
# GoogleTest: the package, or a source tree tests/CMakeLists.txt builds (.deps/googletest).
if ! installed libgtest-dev && [ ! -f /usr/src/googletest/CMakeLists.txt ] &&
   [ ! -f .deps/googletest/CMakeLists.txt ]; then
  missing+=(libgtest-dev)
fi
# OpenMP: GCC's libgomp (clang needs libomp-dev).
if have g++ && ! echo 'int main(){}' | g++ -fopenmp -x c++ - -o /dev/null >/dev/null 2>&1; then
  missing+=(libgomp1)
fi
# The Python bindings' tests, once python/ exists.
if [ -d python ] && [ -n "$(ls -A python 2>/dev/null)" ]; then
  have python3 || missing+=(python3)
  python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
  python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "install_deps: installing ${missing[*]}"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if have sudo; then
      sudo="sudo"
    else
      echo "install_deps: need root (or sudo) to install: ${missing[*]}" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# CMakeLists.txt needs CMake 3.24 or newer.
version=$(cmake --version | head -n1 | sed 's/[^0-9.]*//')
if [ "$(printf '%s\n' 3.24 "$version" | sort -V | head -n1)" != 3.24 ]; then
  echo "install_deps: CMake $version is older than the 3.24 this project needs;" \
       "install a newer one (e.g. python3 -m pip install 'cmake>=3.24')" >&2
  exit 1
fi
echo "install_deps: all dependencies present"
