"""The CuTe layouts of the tensor-core loss kernels, checked on the host (no GPU needed): transposed shared-memory
views, the G tile, and the accumulator ownership the kernels' epilogues assume (tests/loss_mma_layout_check.cu)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cuda_build import CSRC, cutlass_include, nvcc

CHECK = Path(__file__).with_name("loss_mma_layout_check.cu")


@pytest.mark.skipif(nvcc() is None or not cutlass_include(), reason="needs nvcc and the CUTLASS/CuTe headers")
def test_loss_mma_layouts(tmp_path):
    exe = tmp_path / "loss_mma_layout_check"
    build = subprocess.run([nvcc(), str(CHECK), "-o", str(exe), "-std=c++17", "-O1", "--expt-relaxed-constexpr",
                            f"-I{CSRC}", *cutlass_include(), "-gencode=arch=compute_80,code=sm_80"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "mismatches: 0" in run.stdout, run.stdout + run.stderr
