"""Peak extra resident memory of a call, measured in a forked child from the kernel's high-water mark."""
from __future__ import annotations

import ctypes
import os
import pickle
from collections.abc import Callable
from pathlib import Path

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _measure_here(fn: Callable[[], object]) -> float:
    # Every allocation of 4 KiB or more gets fresh pages, so memory freed by earlier calls in the parent
    # cannot hide this call's use; then reset the high-water mark to the current RSS.
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 4096)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    fn()
    return round((_status_kib("VmHWM") - base) / 1024, 1)


def peak_extra_mib(fn: Callable[[], object]) -> float | None:
    """MiB by which peak RSS rises above the starting RSS while ``fn`` runs (None where unsupported).

    Runs ``fn`` once in a forked child (inputs are shared copy-on-write and not counted).
    """
    if not Path("/proc/self/clear_refs").exists() or not hasattr(os, "fork"):
        return None
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            result = _measure_here(fn)
        except Exception:  # report "unknown" rather than a number
            result = None
        with os.fdopen(write_fd, "wb") as pipe:
            pickle.dump(result, pipe)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        result = pickle.load(pipe)
    os.waitpid(pid, 0)
    return result
