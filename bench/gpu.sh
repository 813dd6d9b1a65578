#!/usr/bin/env bash
# One command on a GPU machine: build with CUDA, run the CUDA tests, run the CUDA benchmarks, print the
# comparison table. Uses the machine's own CUDA torch (venv with system site-packages),
# so nothing is downloaded; wheels the machine lacks are installed from ./.whl: nvidia-cutlass (the CuTe
# headers), which `make gpu-wheels` fetches on a machine with internet, and optionally faiss-gpu (VQ baseline).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
python3 -m venv --system-site-packages "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if compgen -G ".whl/*.whl" > /dev/null; then $PIP install --no-index --no-deps .whl/*.whl; fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
CM3LEON_CUDA=1 $PIP install --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import cm3leon_kernels as ck, torch; assert ck.cuda_built(); print('torch', torch.__version__, torch.cuda.get_device_name())"
# The CUDA tests (the CPU suite is CI's job; GPU_TESTS=tests runs everything), then the CUDA benchmarks.
"$VENV/bin/python" -m pytest ${GPU_TESTS:-tests/test_*cuda*.py} -q -rs
mkdir -p .benchmarks
"$VENV/bin/python" -m pytest bench -o python_files='bench_*.py' -k cuda --benchmark-enable \
  --benchmark-json=.benchmarks/gpu.json -q
"$VENV/bin/python" bench/report.py .benchmarks/gpu.json --markdown
