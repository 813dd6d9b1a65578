"""A one-line description of the host for reports and benchmark tables: CPU model, cores and the SIMD
features that decide which CPU kernel level runs (``cm3leon_kernels.cpu_features()`` reports the same)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16")


def describe_machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """E.g. ``"AMD EPYC, 2 cores (avx2, fma, f16c, avx512f, ...)"``; falls back to ``platform`` names where
    ``/proc/cpuinfo`` does not exist (not Linux)."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        return f"{cpu}, {os.cpu_count()} cores"
    simd = ", ".join(f for f in SIMD_FLAGS if f in flags) or "no AVX2"
    return f"{cpu}, {os.cpu_count()} cores ({simd})"
