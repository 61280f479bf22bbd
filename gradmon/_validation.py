"""Argument checks with Keras' wording: what was expected, what was received.

Every public entry point validates here, before the first training step.
Numbers accept numpy scalars wherever Python numbers are accepted.
"""

import math
import numbers
import os
import warnings


def invalid(argument, expected, value):
    return ValueError(
        f"Invalid value for argument `{argument}`. Expected {expected}. "
        f"Received: {argument}={value!r}"
    )


def _is_real(value):
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def _is_int(value):
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def check_positive(argument, value):
    """Returns `value` as a float if it is a finite number > 0."""
    if not _is_real(value) or not value > 0 or not math.isfinite(value):
        raise invalid(argument, "a positive finite number", value)
    return float(value)


def check_non_negative(argument, value):
    """Returns `value` as a float if it is a finite number >= 0."""
    if not _is_real(value) or not value >= 0 or not math.isfinite(value):
        raise invalid(argument, "a non-negative finite number", value)
    return float(value)


def check_positive_int(argument, value):
    if not _is_int(value) or value < 1:
        raise invalid(argument, "a positive integer", value)
    return int(value)


def check_non_negative_int(argument, value):
    if not _is_int(value) or value < 0:
        raise invalid(argument, "a non-negative integer", value)
    return int(value)


def check_bool(argument, value):
    """Accepts Python and numpy booleans only (not "no", not 0)."""
    if type(value).__name__ not in ("bool", "bool_"):
        raise invalid(argument, "True or False", value)
    return bool(value)


def check_choice(argument, value, choices):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value not in choices:
        raise invalid(argument, f"one of {list(choices)}", value)
    return value


def check_log_dir(value, argument="log_dir"):
    """A non-empty path (str, bytes or os.PathLike), returned as `str`."""
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    elif hasattr(value, "__fspath__"):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise invalid(argument, "a non-empty directory path", value)
    return value


_warned = set()


def warn_once(key, message):
    """Warns the first time `key` is seen in this process."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, stacklevel=3)
