"""Argument checks shared by the package's command lines (``python -m cm3leon.training``, ``cm3leon.demo``,
``cm3leon.tokenizer.train_text`` / ``train_image``, ``cm3leon.data.scorer_eval``): argparse ``type=``
callables for counts and amounts, and the checks that an output folder or file can be written. Each lets a
bad argument end in argparse's one-line error with exit status 2 before any work, instead of a traceback
after minutes of it."""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse ``type=``: an int >= ``minimum`` ("argument --n: must be a positive int, got -3")."""
    wanted = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):  # float() alone takes nan and inf
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse ``type=``: a finite float >= 0."""
    if (value := _finite_float(text)) < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse ``type=``: a finite float > 0 (a learning rate)."""
    if (value := _finite_float(text)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def output_dir_error(path: str | os.PathLike, *, writable: bool = True) -> str | None:
    """Why ``path`` cannot be, or be created as, a folder (it or a folder above it is a file; with
    ``writable``, the nearest existing one is not writable), or None when it can."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())  # "/" always exists
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def output_file_error(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written at ``path`` (it is a folder, or its folder cannot be created), or None."""
    if Path(path).is_dir():
        return "is a folder, not a file"
    return output_dir_error(Path(path).absolute().parent)
