"""Cheap argument checks shared by the Python wrappers: errors name the offending argument."""
from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name: str, t: object, *, dtypes: Iterable[torch.dtype] | None = None,
                 ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    """Checks that ``t`` is a tensor with an allowed dtype and rank; returns it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    return t


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first); got strides {t.stride()}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device: {listed}")


def check_supported_device(name: str, t: torch.Tensor, devices: tuple[str, ...]) -> None:
    if t.device.type not in devices:
        raise NotImplementedError(
            f"{name} is on {t.device}; this op has kernels for {', '.join(devices)} only")


def check_fake_devices(op: str, cpu_ok: tuple[str, ...] = (), **tensors: torch.Tensor | None) -> None:
    """The device check of a fake kernel (``torch.library.register_fake``).

    Fake kernels run while tracing (``torch.compile``, FakeTensors) and also for *real* calls in which one
    input is a ``meta`` tensor: the dispatcher then prefers the meta kernel over the CPU/CUDA one, so without
    this check a raw ``torch.ops.cm3leon.*`` call mixing meta and CPU tensors would skip every device check
    and return uninitialised memory. All given tensors must share a device; those named in ``cpu_ok`` may
    also be on the CPU (e.g. a step counter beside CUDA logits).
    """
    present = {name: t for name, t in tensors.items() if t is not None}
    device = next(iter(present.values())).device
    for name, t in present.items():
        if t.device != device and not (name in cpu_ok and t.device.type == "cpu"):
            listed = ", ".join(f"{n} on {x.device}" for n, x in present.items())
            raise ValueError(f"cm3leon::{op}: tensors must be on one device (meta tensors cannot be mixed "
                             f"with others), got {listed}")


def is_finite(x: float) -> bool:
    """``math.isfinite`` for floats, also traceable when ``x`` is a symbolic float: ``torch.compile`` makes a
    float argument symbolic once its value changes between calls (always with ``dynamic=True``), and dynamo
    cannot trace ``math.isfinite`` on one (a graph break, an error under ``fullgraph=True``)."""
    return -math.inf < x < math.inf  # False for NaN too


def as_int(name: str, x: object) -> int:
    """x as a Python int: ints and integer scalars such as numpy.int64 (anything with __index__), not bools."""
    if type(x) is int:
        return x
    if isinstance(x, bool) or not hasattr(type(x), "__index__"):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    return operator.index(x)


def as_float(name: str, x: object) -> float:
    """x as a Python float: ints, floats and real scalars such as numpy.float32 (numbers.Real), not bools; an
    int too large for a float becomes inf, for the caller's range check to refuse."""
    if type(x) is float:
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf
