#!/usr/bin/env bash
# One command on a GPU machine: build with CUDA, run the whole test suite (CUDA tests included), run the
# benchmarks, print the comparison table. Uses the machine's own CUDA torch (venv with system site-packages),
# so nothing is downloaded; wheels the machine lacks (e.g. nvidia-cutlass, faiss-gpu) can be placed in
# ./wheels and are installed from there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
python3 -m venv --system-site-packages "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if [ -d wheels ]; then $PIP install --no-index --find-links wheels wheels/*.whl || true; fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
CM3LEON_CUDA=1 $PIP install --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import cm3leon_kernels as ck, torch; assert ck.cuda_built(); print('torch', torch.__version__, torch.cuda.get_device_name())"
"$VENV/bin/python" -m pytest tests -q -x
mkdir -p .benchmarks
"$VENV/bin/python" -m pytest bench -o python_files='bench_*.py' --benchmark-enable --benchmark-json=.benchmarks/gpu.json -q
"$VENV/bin/python" bench/report.py .benchmarks/gpu.json --markdown
