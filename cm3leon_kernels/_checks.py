"""Cheap argument checks shared by the Python wrappers: errors name the offending argument."""
from __future__ import annotations

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


def as_int(name: str, x: object) -> int:
    """x as a Python int: ints and integer scalars such as numpy.int64 (anything with __index__), not bools."""
    if type(x) is int:
        return x
    if isinstance(x, bool) or not hasattr(type(x), "__index__"):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    return operator.index(x)
