"""CUDA compile check: every torch-free CUDA translation unit in csrc/ builds for sm_80 and sm_90a.

Runs on machines without a GPU (only nvcc is needed), so the CUDA kernels always compile even when no GPU is
at hand. Kernel TUs (*.cu) must not include torch headers: the at::Tensor glue lives in *_launch.cpp files.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_SOURCES = sorted(CSRC.rglob("*.cu"))
ARCHS = ("80", "90a")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    candidate = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return str(candidate) if candidate.exists() else None


def _cutlass_include() -> list[str]:
    try:
        import cutlass_library
    except ImportError:
        return []
    path = Path(cutlass_library.__file__).parent / "source" / "include"
    return [f"-I{path}"] if path.is_dir() else []


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "no .cu files found under csrc/"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: str(p.relative_to(CSRC)))
def test_cuda_sources_are_torch_free(source):
    headers = [source, *source.parent.glob("*.cuh")]
    for path in headers:
        text = path.read_text()
        assert not re.search(r"#\s*include\s*[<\"](torch|ATen|c10)/", text), f"{path} includes torch headers"


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_cuda_sources_compile_for_sm80_and_sm90a(tmp_path):
    nvcc = _nvcc()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]

    def compile_one(source: Path) -> tuple[Path, subprocess.CompletedProcess]:
        cmd = [nvcc, "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")), "-std=c++17", "-O3",
               "-DNDEBUG", "--expt-relaxed-constexpr", f"-I{CSRC}", *_cutlass_include(), *gencode]
        return source, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(compile_one, CUDA_SOURCES))
    failures = [f"{src.relative_to(CSRC)}:\n{proc.stderr[-3000:]}" for src, proc in results if proc.returncode]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
