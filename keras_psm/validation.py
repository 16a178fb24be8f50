"""Argument checks shared by every public entry point.

Each check raises ``ValueError`` (bad value) or ``TypeError`` (bad type) with
a message that names the argument, what was given and what is allowed, in
the spirit of scikit-learn's parameter validation. ``where`` prefixes the
message with the place the argument belongs to (a layer, a config class).
"""

import numbers

import numpy as np


def _prefix(where):
    return f"{where}: " if where else ""


def check_int(value, name, *, minimum=None, maximum=None, where=None, allow_none=False):
    """Return ``value`` as an int after checking minimum <= value <= maximum."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{_prefix(where)}`{name}` must be an integer, got {value!r} "
            f"({type(value).__name__})."
        )
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(
            f"{_prefix(where)}`{name}` must be {_range_text(minimum, maximum)}, got {value}."
        )
    return value


def check_float(value, name, *, minimum=None, maximum=None, exclusive_minimum=False,
                where=None, allow_none=False):
    """Return ``value`` as a float after checking its range (finite only)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{_prefix(where)}`{name}` must be a number, got {value!r} "
            f"({type(value).__name__})."
        )
    value = float(value)
    too_small = minimum is not None and (
        value <= minimum if exclusive_minimum else value < minimum
    )
    too_large = maximum is not None and value > maximum
    if not np.isfinite(value) or too_small or too_large:
        low = f"> {minimum}" if exclusive_minimum else f">= {minimum}"
        allowed = " and ".join(
            part for part in (
                low if minimum is not None else "",
                f"<= {maximum}" if maximum is not None else "",
            ) if part
        ) or "finite"
        raise ValueError(f"{_prefix(where)}`{name}` must be {allowed}, got {value}.")
    return value


def check_bool(value, name, *, where=None):
    """Return ``value`` if it is True or False (not 0/1 or a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{_prefix(where)}`{name}` must be True or False, got {value!r}.")
    return value


def check_choice(value, name, choices, *, where=None):
    """Return ``value`` if it is one of ``choices``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(
            f"{_prefix(where)}`{name}` must be one of {allowed}, got {value!r}."
        )
    return value


def check_finite_array(array, name, *, where=None):
    """Return ``array`` as float64 if every entry is finite."""
    array = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(
            f"{_prefix(where)}`{name}` holds {bad} NaN or Inf value(s); "
            "only finite weights can be compressed."
        )
    return array


def _range_text(minimum, maximum):
    if minimum is not None and maximum is not None:
        return f"between {minimum} and {maximum}"
    if minimum is not None:
        return f">= {minimum}"
    return f"<= {maximum}"
