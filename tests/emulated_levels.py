"""Runs the torch-level kernel tests at the CPU levels this machine lacks, on an emulated build.

    python tests/emulated_levels.py [--levels avx512,avx512_bf16,amx_bf16] [--workdir DIR]
                                    [--fa-source SRC] [-- PYTEST_ARGS...]

Builds the extension once with ``CM3LEON_EMULATE_ISA=1`` (the AVX-512 and AMX levels compiled for AVX2 with
tests/isa_emulation.h forced in, see docs/kernels.md) into WORKDIR/lib beside a copy of the package, then,
per level, runs the kernel test files below with that copy imported and ``CM3LEON_CPU_ISA=<level>``: the
FlashAttention rule against PyTorch in the same precision, poisoned outputs, bad-input errors. With
``--fa-source`` (a flash-attn checkout or sdist, as for tests/flash_attn_suite/run.py) it also runs
FlashAttention's own tests, bf16 cases only (``dtype1`` in FA's parametrisation) less the one that imports
FA-private internals (``test_flash_attn_varlen_paged_kv_num_splits``), at each level.

This complements tests/test_isa_oracle.py (the kernel bodies against float64, part of ``make test``): it
exercises the same bodies through the launchers, autograd and PyTorch's own bf16 baselines. Emulated
intrinsics are slow (about a minute per level for the kernel tests, 7 minutes for FA's bf16 cases), the
speed says nothing about the real instructions, and the benchmarks refuse such a build. Exits non-zero when
any run fails.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ["avx512", "avx512_bf16", "amx_bf16"]
FA_CASES = "dtype1 and not test_flash_attn_varlen_paged_kv_num_splits"
KERNEL_TESTS = ["test_attention.py", "test_attention_dropout.py", "test_attention_features.py",
                "test_attention_one_key.py", "test_kvcache_features.py", "test_flash_attn_interface.py",
                "test_loss.py", "test_vq.py", "test_model_loss.py", "test_fuzz_ops.py",
                "test_reliability_kernels.py"]


def build(workdir: Path) -> Path:
    """The emulated extension and the package's Python files in workdir/lib; returns that directory."""
    lib = workdir / "lib"
    env = os.environ | {"CM3LEON_EMULATE_ISA": "1", "CM3LEON_CUDA": "0"}
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib),
                    "--build-temp", str(workdir / "build")], cwd=ROOT, env=env, check=True)
    shutil.copytree(ROOT / "cm3leon_kernels", lib / "cm3leon_kernels", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return lib


def check_level(lib: Path, level: str) -> None:
    """Fails unless a process started as the tests' are imports the emulated build and runs `level`."""
    check = ("import cm3leon_kernels as ck; f = ck.cpu_features(); "
             f"assert f['emulated'] and f['isa'] == {level!r}, f")
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=run_env(lib, level), check=True)


def run_env(lib: Path, level: str) -> dict[str, str]:
    """The environment of every process of a run, test subprocesses included: the emulated build first on
    the path, ahead of the working directory too (PYTHONSAFEPATH: a checkout's own cm3leon_kernels, the
    regular build, would otherwise win in processes started there)."""
    path = os.pathsep.join(p for p in (str(lib), os.environ.get("PYTHONPATH", "")) if p)
    return os.environ | {"PYTHONPATH": path, "PYTHONSAFEPATH": "1", "CM3LEON_CPU_ISA": level}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default=",".join(LEVELS), help="comma-separated, of " + ", ".join(LEVELS))
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "cm3leon_emulated_levels")
    parser.add_argument("--fa-source", help="a flash-attn checkout or sdist: also run FA's bf16 cases")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest (e.g. -k backward -x)")
    args = parser.parse_args()
    levels = [level for level in args.levels.split(",") if level]
    unknown = sorted(set(levels) - set(LEVELS))
    if unknown:
        parser.error(f"unknown levels {unknown}; choose from {LEVELS}")
    lib = build(args.workdir)
    outcomes = {}
    for level in levels:
        check_level(lib, level)
        tests = [str(ROOT / "tests" / name) for name in KERNEL_TESTS]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), *tests,
               *args.pytest_args]
        env = run_env(lib, level)
        outcomes[f"kernel tests at {level}"] = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        if args.fa_source:
            cmd = [sys.executable, str(ROOT / "tests/flash_attn_suite/run.py"), "--source", args.fa_source,
                   "--max-seqlen", "256", "--workdir", str(args.workdir / f"fa_{level}"),
                   "--", "-k", FA_CASES]
            fa = subprocess.run(cmd, cwd=ROOT, env=env)
            outcomes[f"FlashAttention's bf16 cases at {level}"] = fa.returncode
    for what, code in outcomes.items():
        print(f"{what}: {'passed' if code == 0 else f'FAILED (exit {code})'}")
    return int(any(outcomes.values()))


if __name__ == "__main__":
    sys.exit(main())
