"""Peak extra resident memory of one call, measured in a fresh (spawned) process.

A fresh interpreter is needed: forking a process whose OpenMP thread pool is running can deadlock the child,
and in a long-lived process memory freed by earlier calls would hide this call's use.
"""
from __future__ import annotations

import ctypes
import importlib
import multiprocessing
from pathlib import Path

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _measure(factory: str, args: tuple) -> float:
    module, name = factory.split(":")
    fn = getattr(importlib.import_module(module), name)(*args)  # builds the inputs, returns the call
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 4096)  # every buffer >= 4 KiB gets fresh pages
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    base = _status_kib("VmRSS")
    fn()
    return round((_status_kib("VmHWM") - base) / 1024, 1)


def peak_extra_mib(factory: str, *args) -> float | None:
    """MiB by which peak RSS rises while the call runs; None where /proc does not allow measuring.

    ``factory`` is ``"module:function"``; ``function(*args)`` runs in the child, builds the inputs (not
    counted) and returns the zero-argument call to measure.
    """
    if not Path("/proc/self/clear_refs").exists():
        return None
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, (factory, args))
