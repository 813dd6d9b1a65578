"""pip entry point: builds cm3leon_kernels._C with CMake + ninja against the torch that will import it.

Environment knobs:
  CM3LEON_CUDA=0|1     force the CUDA kernels off/on (default: on when nvcc is found and torch is a CUDA build)
  CM3LEON_NATIVE=1     also tune every CPU kernel level for this host (-march=native; the default build is
                       portable and picks AVX2 / AVX-512 kernels at load time from cpuid)
  CM3LEON_CUDA_ARCHS   CMake CUDA architectures (default "80;90a")
  MAX_JOBS             parallel compile jobs (default: all cores)
  CM3LEON_EMULATE_ISA=1  test builds only: compile the AVX-512 and AMX kernel levels as AVX2 emulations
                       (SIMDe, from the `test` extra's simde-py), so an AVX2 CPU runs them; never for real use
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _import_torch():
    """Import the torch this extension will run against.

    Under pip's build isolation the invoking environment's site-packages are hidden; the interpreter (and so
    its prefix) is still the user's, so we look there instead of letting pip resolve a different torch: a C++
    extension must be built against the exact torch it is loaded into.
    """
    try:
        import torch
        return torch
    except ImportError:
        pass
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if Path(path, "torch").is_dir() and path not in sys.path:
            sys.path.append(path)
    try:
        import torch
        return torch
    except ImportError as err:
        raise RuntimeError(
            "cm3leon_kernels is a PyTorch extension: install torch first (e.g. `pip install torch`), then "
            "`pip install .` (or `pip install --no-build-isolation .`)."
        ) from err


def _cutlass_include() -> str:
    try:
        import cutlass_library  # from the nvidia-cutlass wheel
    except ImportError:
        return ""
    path = Path(cutlass_library.__file__).parent / "source" / "include"
    return str(path) if path.is_dir() else ""


def _simde_include() -> str:
    try:
        import simde_py
    except ImportError as err:
        raise RuntimeError("CM3LEON_EMULATE_ISA=1 needs SIMDe: pip install simde-py (the `test` extra)") from err
    base = Path(simde_py.get_include())
    return str(next(p for p in (base, base.parent) if (p / "simde/x86/avx512.h").exists()))


def _want_cuda(torch) -> bool:
    forced = os.environ.get("CM3LEON_CUDA")
    has_nvcc = shutil.which("nvcc") is not None or Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                           "nvcc").exists()
    if forced is not None:
        if forced == "1" and (torch.version.cuda is None or not has_nvcc):
            raise RuntimeError("CM3LEON_CUDA=1 needs both nvcc and a CUDA build of torch")
        return forced == "1"
    return torch.version.cuda is not None and has_nvcc


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        torch = _import_torch()
        from torch.utils import cpp_extension

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = _want_cuda(torch)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DTORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}",
            f"-DTORCH_LIBRARY_DIR={Path(torch.__file__).parent / 'lib'}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DCM3LEON_CUDA={'ON' if cuda else 'OFF'}",
            f"-DCM3LEON_NATIVE={'ON' if os.environ.get('CM3LEON_NATIVE') == '1' else 'OFF'}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
        ]
        if os.environ.get("CM3LEON_EMULATE_ISA") == "1":
            args += ["-DCM3LEON_EMULATE_ISA=ON", f"-DCM3LEON_SIMDE_INCLUDE={_simde_include()}"]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if cuda:
            args += [f"-DCUTLASS_INCLUDE_DIR={_cutlass_include()}",
                     f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('CM3LEON_CUDA_ARCHS', '80;90a')}"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[Extension("cm3leon_kernels._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
