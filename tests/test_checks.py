"""cm3leon's integer argument check: bools are never ints, numpy integers are, bounds name the argument."""
import numpy as np
import pytest

from cm3leon._checks import check_int, is_int


def test_is_int():
    assert is_int(3) and is_int(np.int64(3)) and is_int(-1)
    assert not is_int(True) and not is_int(3.0) and not is_int("3") and not is_int(None)


@pytest.mark.parametrize("minimum, maximum, value, wanted", [
    (1, None, 0, "n must be a positive int, got 0"),
    (0, None, -2, "n must be a non-negative int, got -2"),
    (16, None, 8, "n must be an int >= 16, got 8"),
    (None, 4, 5, "n must be an int <= 4, got 5"),
    (1, 3, 4, r"n must be an int in \[1, 3\], got 4"),
    (1, None, True, "n must be a positive int, got True"),
    (None, None, 2.0, "n must be an int, got 2.0"),
])
def test_rejects_with_the_argument_name(minimum, maximum, value, wanted):
    with pytest.raises(ValueError, match=wanted):
        check_int("n", value, minimum, maximum)


def test_returns_a_python_int():
    out = check_int("n", np.int32(7), 1, 7)
    assert out == 7 and type(out) is int
