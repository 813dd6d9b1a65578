# make demo | make test | make bench | make study | make build | make clean — each sets itself up from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# torch is pinned to the CPU build on this machine's disk; never let pip resolve an unpinned torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.deps-stamp
PYTEST_ARGS ?=

.PHONY: test demo study bench build gpu gpu-wheels fa-suite isa-emulated clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install "setuptools>=64" wheel cmake ninja
	$(PIP) install nvidia-cutlass  # CUTLASS/CuTe headers for the CUDA compile check
	touch $(STAMP)

# Editable install with the test, retrieval and training extras (dependencies come from pyproject.toml): builds
# cm3leon_kernels._C with CMake + ninja against the venv's torch, which already satisfies "torch>=2.4".
build: $(STAMP)
	$(PIP) install --no-build-isolation -e ".[test,retrieval,training]"

test: build
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: build
	mkdir -p .benchmarks
	$(PY) -m pytest bench -o python_files='bench_*.py' --benchmark-enable --benchmark-json=.benchmarks/latest.json -q
	$(PY) bench/report.py .benchmarks/latest.json

# FlashAttention's own tests/test_flash_attn.py against cm3leon_kernels on the CPU (a covering subset of its
# grid, ~30 min on 2 cores; not part of `make test`). FA_SOURCE: a flash-attn checkout, bare mirror or sdist
# (docs/attention.md, "FlashAttention's test suite").
FA_SOURCE ?=
FA_SUITE_ARGS ?=
fa-suite: build
	@test -n "$(FA_SOURCE)" || { echo "set FA_SOURCE=<flash-attn checkout or sdist>"; exit 2; }
	$(PIP) install einops
	$(PY) tests/flash_attn_suite/run.py --source $(FA_SOURCE) $(FA_SUITE_ARGS)

# The kernel tests at the AVX-512 / AVX-512 BF16 / AMX levels on any AVX2 machine, through an emulated build
# (slow; checks logic, not speed). FA_SOURCE, when set, adds FlashAttention's bf16 cases.
isa-emulated: build
	$(if $(FA_SOURCE),$(PIP) install einops)
	$(PY) tests/emulated_levels.py $(if $(FA_SOURCE),--fa-source $(FA_SOURCE))

# The recipe end to end on the built-in shapes world; writes out/demo/report.md (rerun to resume).
demo: build
	$(PY) -m cm3leon.demo --out out/demo --scale demo

# The longer study: three seeds, a retrieval-free control run, more steps and prompts (hours on 2 cores).
study: build
	$(PY) -m cm3leon.demo --out out/study --scale study

# One command on a GPU machine: CUDA build, CUDA tests, GPU benchmarks (see bench/gpu.sh).
gpu:
	bash bench/gpu.sh

# Wheels the offline GPU machine lacks (Python 3.12 there), fetched here into .whl/ for bench/gpu.sh.
gpu-wheels: $(STAMP)
	$(PIP) download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl nvidia-cutlass==4.2.0.0

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks cm3leon_kernels/_C*.so
	find . -name __pycache__ -prune -exec rm -rf {} +
