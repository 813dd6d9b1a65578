"""Where the CUDA toolchain is, for the tests that compile CUDA code without a GPU: nvcc, the CUDA and CUTLASS
headers, and the kernel sources."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def nvcc() -> str | None:
    """The nvcc on PATH, else $CUDA_HOME's (default /usr/local/cuda); None when there is none."""
    found = shutil.which("nvcc")
    if found:
        return found
    candidate = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return str(candidate) if candidate.exists() else None


def cutlass_include() -> list[str]:
    """The -I flag of the nvidia-cutlass wheel's CUTLASS/CuTe headers, or [] without the wheel."""
    try:
        import cutlass_library
    except ImportError:
        return []
    path = Path(cutlass_library.__file__).parent / "source" / "include"
    return [f"-I{path}"] if path.is_dir() else []


def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (cuda_runtime_api.h), or None."""
    compiler = nvcc()
    if compiler is None:
        return None
    for root in (Path(compiler).resolve().parents[1], Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))):
        if (root / "include" / "cuda_runtime_api.h").exists():
            return root / "include"
    return None
