"""The sm80 attention kernels' fragment layouts, checked on the host (no GPU needed, only nvcc + CuTe).

The kernels mask scores and rescale outputs using closed-form (row, column) positions of each accumulator
register, and feed the score accumulators straight into the next MMA as its A operand. These facts are
properties of CuTe layouts, which are host-evaluable: tests/cuda/attention_layout_check.cu enumerates every
thread of every tile configuration and compares.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cuda_build import CSRC, cutlass_include, nvcc

SOURCE = Path(__file__).parent / "cuda" / "attention_layout_check.cu"


@pytest.mark.skipif(nvcc() is None or not cutlass_include(), reason="needs nvcc and the CUTLASS headers")
def test_sm80_fragment_layouts_match_the_kernels_formulas(tmp_path):
    exe = tmp_path / "layout_check"
    build = subprocess.run([nvcc(), "-std=c++17", "-O1", "--expt-relaxed-constexpr", f"-I{CSRC}",
                            *cutlass_include(), str(SOURCE), "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and "FAIL" not in run.stdout, run.stdout[-3000:]
    assert run.stdout.count(": ok") == 3, run.stdout
