"""The integer argument checks of the cm3leon package: one definition of "an int" (bools excluded) and one
error wording, so every API names its bad argument the same way."""
from __future__ import annotations

import operator
from typing import Any


def is_int(value: Any) -> bool:
    """True for Python ints and integer scalars such as ``numpy.int64`` (anything with ``__index__``), False
    for bools (``True`` is an ``int`` to Python, never a count or an id here)."""
    return not isinstance(value, bool) and hasattr(type(value), "__index__")


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int if it is one (see :func:`is_int`) within ``[minimum, maximum]``.

    Raises:
        ValueError naming ``name``: "must be a positive int" (minimum 1), "a non-negative int" (minimum 0),
        "an int >= m", "an int <= m" or "an int in [lo, hi]", followed by the value given.
    """
    if is_int(value):
        number = operator.index(value)
        if (minimum is None or number >= minimum) and (maximum is None or number <= maximum):
            return number
    if maximum is not None:
        wanted = f"an int in [{minimum}, {maximum}]" if minimum is not None else f"an int <= {maximum}"
    elif minimum == 1:
        wanted = "a positive int"
    elif minimum == 0:
        wanted = "a non-negative int"
    else:
        wanted = f"an int >= {minimum}" if minimum is not None else "an int"
    raise ValueError(f"{name} must be {wanted}, got {value!r}")
