"""Argument checks with Keras' wording: what was expected, what was received."""

import numbers
import warnings


def invalid(argument, expected, value):
    return ValueError(
        f"Invalid value for argument `{argument}`. Expected {expected}. "
        f"Received: {argument}={value!r}"
    )


def check_positive(argument, value):
    """Returns `value` as a float if it is a finite number > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not value > 0
        or value == float("inf")
    ):
        raise invalid(argument, "a positive finite number", value)
    return float(value)


def check_non_negative_int(argument, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise invalid(argument, "a non-negative integer", value)
    return int(value)


def check_choice(argument, value, choices):
    if value not in choices:
        raise invalid(argument, f"one of {list(choices)}", value)
    return value


_warned = set()


def warn_once(key, message):
    """Warns the first time `key` is seen in this process."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, stacklevel=3)
