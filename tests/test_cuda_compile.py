"""CUDA compile check: every torch-free CUDA translation unit in csrc/ builds for sm_80 and sm_90a.

Runs on machines without a GPU (only nvcc is needed), so the CUDA kernels always compile even when no GPU is
at hand. Kernel TUs (*.cu) must not include torch headers: the at::Tensor glue lives in *_launch.cpp files.
"""
from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cuda_build import CSRC, cuda_include, cutlass_include, nvcc

CUDA_SOURCES = sorted(CSRC.rglob("*.cu"))
ARCHS = ("80", "90a")


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "no .cu files found under csrc/"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: str(p.relative_to(CSRC)))
def test_cuda_sources_are_torch_free(source):
    headers = [source, *source.parent.glob("*.cuh")]
    for path in headers:
        text = path.read_text()
        assert not re.search(r"#\s*include\s*[<\"](torch|ATen|c10)/", text), f"{path} includes torch headers"


@pytest.mark.skipif(nvcc() is None, reason="nvcc not found")
def test_cuda_sources_compile_for_sm80_and_sm90a(tmp_path):
    compiler = nvcc()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]

    def compile_one(source: Path) -> tuple[Path, subprocess.CompletedProcess]:
        cmd = [compiler, "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")), "-std=c++17", "-O3",
               "-DNDEBUG", "--expt-relaxed-constexpr", f"-I{CSRC}", *cutlass_include(), *gencode]
        return source, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(compile_one, CUDA_SOURCES))
    failures = [f"{src.relative_to(CSRC)}:\n{proc.stderr[-3000:]}" for src, proc in results if proc.returncode]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)


CUDA_GLUE = sorted(CSRC.rglob("*_cuda_launch.cpp")) + [CSRC / "ops.cpp"]


@pytest.mark.skipif(cuda_include() is None, reason="CUDA toolkit headers not found")
def test_cuda_launchers_compile_against_torch_headers(tmp_path):
    """The at::Tensor glue of the CUDA kernels (built only with a CUDA torch) type-checks here too.

    A CPU torch wheel ships the c10/cuda headers but not the one CMake generates for CUDA builds; a stand-in
    with the same content is provided.
    """
    import sysconfig

    from torch.utils import cpp_extension

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in (CSRC, *cpp_extension.include_paths(), tmp_path, cuda_include(),
                                    sysconfig.get_paths()["include"])]

    def check(source: Path) -> tuple[Path, subprocess.CompletedProcess]:
        cmd = ["c++", "-std=c++20", "-fsyntax-only", "-DCM3LEON_WITH_CUDA=1", *includes, str(source)]
        return source, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(check, CUDA_GLUE))
    failures = [f"{src.relative_to(CSRC)}:\n{proc.stderr[-3000:]}" for src, proc in results if proc.returncode]
    assert not failures, "CUDA glue does not compile:\n" + "\n".join(failures)
