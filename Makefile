# omnimoe: `make run` builds and benchmarks, `make test` builds and runs every test.
# The CMake build lives in build/ (Release, Ninja); `make deps` installs what is missing.

BUILD_DIR ?= build
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# Extra CMake options, e.g. `make test CMAKE_FLAGS=-DOMNIMOE_CUDA=OFF`.
CMAKE_FLAGS ?=
OMNIMOE := ./$(BUILD_DIR)/omnimoe
STAMP = $(shell date -u +%Y%m%dT%H%M%SZ)-$(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

.PHONY: all deps configure build run test bench clean format

all: build

deps:
	./scripts/install_deps.sh

configure: deps
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

# The bench on the default device: ref-quickstart on a GPU, cpu-small on the CPU.
run: build
	$(OMNIMOE) bench

# C++ tests (CUDA tests skip without a GPU), then the Python tests (test-python, below).
test: build
	ctest --test-dir $(BUILD_DIR) --output-on-failure -j $(JOBS)
	$(MAKE) test-python

# Every named GPU config; results as JSON in bench/results/.
bench: build
	mkdir -p bench/results
	$(OMNIMOE) bench --device cuda --config all --json bench/results/$(STAMP).json

clean:
	rm -rf $(BUILD_DIR)

format:
	git ls-files -z '*.h' '*.cpp' '*.cu' '*.cuh' | xargs -0 clang-format -i

# The PyTorch package: tests/python/run.sh builds it with pip into a virtual environment under
# build-python/ (installing PyTorch from PyPI where it is missing) and runs tests/python.
.PHONY: test-python
test-python:
	./tests/python/run.sh
