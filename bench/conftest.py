"""Benchmark conventions (read by bench/report.py).

Every benchmark calls ``record(benchmark, case=..., impl=..., work=..., unit=...)``:
- ``case``: the problem (e.g. ``"vq N=16384 K=8192 D=256 fp32"``); all implementations of one case share it.
- ``impl``: ``"cm3leon"`` for our kernel, anything else is a baseline it is compared with.
- ``work`` and ``unit``: the amount of work per call and its rate unit (``"GFLOP/s"`` with work in FLOPs,
  ``"GB/s"`` with work in bytes, or ``"tok/s"`` with work in tokens), so the report can print throughput.
- extra keyword arguments (e.g. ``peak_extra_mib``) are shown in the report's notes column.
"""
from __future__ import annotations

import os
import re

import pytest
import torch


def pytest_sessionstart(session):
    import cm3leon_kernels as ck

    if ck.cpu_features().get("emulated"):
        pytest.exit("this cm3leon_kernels build emulates its AVX-512 and AMX kernels (CM3LEON_EMULATE_ISA=1): "
                    "timings would mean nothing", returncode=2)


def record(benchmark, *, case: str, impl: str, work: float | None = None, unit: str | None = None,
           **extra) -> None:
    benchmark.group = case
    benchmark.extra_info.update(impl=impl, work=work, unit=unit, threads=torch.get_num_threads(), **extra)


@pytest.fixture
def bench_record():
    return record


def cpu_path(impl: str, fn):
    """``fn`` run at the CPU kernel level an impl name asks for: ``"cm3leon[avx2]"`` forces the avx2 kernels
    for the call (so the chosen level and a lower one run side by side); other names run ``fn`` as is. A level
    this machine cannot run is skipped."""
    match = re.fullmatch(r"cm3leon\[(\w+)\]", impl)
    if match is None:
        return fn
    import cm3leon_kernels as ck
    from cm3leon_kernels import _C

    level = match.group(1)
    if level not in ck.cpu_features()["supported"]:
        pytest.skip(f"this CPU or build cannot run the {level} kernels")

    def call():
        _C._force_cpu_isa(level)
        try:
            return fn()
        finally:
            _C._force_cpu_isa(os.environ.get("CM3LEON_CPU_ISA", ""))
    return call
