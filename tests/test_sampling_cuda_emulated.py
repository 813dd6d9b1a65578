"""The CUDA sampling kernel bodies run on the CPU, token for token against the CPU kernel.

tests/sampling_cuda_emulator.cpp compiles csrc/sampling/sampling_cuda_{cfg,contrastive}.cuh with the host
compiler, emulating one block's 1024 threads as fibers (barriers, warp shuffles/ballots/matches, shared
memory), and samples random cases (every filter, S = 1/2/3, CD-K, masks, odd ranges, fp32/bf16/fp16, row caches
smaller than the row, subnormal CD-K logits) with both kernels. This checks the CUDA kernels' logic on machines
without a GPU; the real GPU tests are in test_sampling_cuda.py.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cuda_build import cuda_include

ROOT = Path(__file__).resolve().parents[1]
EMULATOR = Path(__file__).with_name("sampling_cuda_emulator.cpp")


def _samplers_flush_to_zero() -> bool:
    """Whether the CMake build compiles the sampling kernels with flush-to-zero: --use_fast_math implies
    --ftz=true unless their sources are given --ftz=false."""
    cmake = (ROOT / "CMakeLists.txt").read_text()
    keep = re.search(r"set_source_files_properties\([^)]*sampling_cuda_cfg\.cu[^)]*sampling_cuda_contrastive\.cu"
                     r"[^)]*--ftz=false", cmake)
    return ("--use_fast_math" in cmake or "--ftz=true" in cmake) and keep is None


@pytest.mark.skipif(shutil.which("c++") is None or cuda_include() is None,
                    reason="needs a host C++ compiler and the CUDA toolkit headers")
def test_cuda_kernel_bodies_match_cpu_kernel(tmp_path):
    exe = tmp_path / "sampling_cuda_emulator"
    # The CPU kernel is built as the only level (0) of a one-level build, for this host (-march=native), in
    # its own object as CMake does; the emulator and the level selection (cpu_features.cpp) are host code.
    flags = ["c++", "-std=c++20", "-O1", "-ffp-contract=off", "-march=native", "-fopenmp", f"-I{ROOT / 'csrc'}",
             "-DCM3LEON_MAX_ISA_LEVEL=0"]
    kernel = tmp_path / "sampling_cpu.o"
    csrc = ROOT / "csrc"
    for cmd in ([*flags, "-DCM3LEON_ISA_LEVEL=0", "-c", str(csrc / "sampling" / "sampling_cpu.cpp"), "-o",
                 str(kernel)],
                [*flags, f"-I{cuda_include()}", str(EMULATOR), str(csrc / "common" / "cpu_features.cpp"),
                 str(kernel), "-o", str(exe)]):
        build = subprocess.run(cmd, capture_output=True, text=True)
        assert build.returncode == 0, build.stderr[-3000:]
    # The kernel bodies run with the GPU build's subnormal handling (x86 FTZ/DAZ when it flushes).
    ftz = "1" if _samplers_flush_to_zero() else "0"
    env = {key: value for key, value in os.environ.items() if key != "CM3LEON_CPU_ISA"}
    run = subprocess.run([str(exe), "40", "1", ftz], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "mismatching rows: 0" in run.stdout
