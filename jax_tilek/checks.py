"""Checks of a public function's arguments, shared by every family: each names the function and the
argument in its error (TypeError for a wrong kind of value, ValueError for a value out of range)."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def as_array(op: str, name: str, value: Any, optional: bool = False) -> jax.Array | None:
    """``value`` as a JAX array of numbers or booleans (a traced value stays traced; None stays None
    where ``optional``). Arrays, NumPy scalars, Python numbers and objects with ``__jax_array__`` are
    accepted; lists, tuples, strings, None and other objects are a TypeError, as are object arrays and
    Python numbers out of JAX's range."""
    if value is None and optional:
        return None
    if not (isinstance(value, (jax.Array, np.ndarray, np.generic, bool, int, float, complex)) or hasattr(value, "__jax_array__")):
        raise TypeError(f"{op}: {name} must be an array, got {type(value).__name__}")
    try:
        array = jnp.asarray(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"{op}: {name} cannot be a JAX array: {e}") from None
    if not (jnp.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise TypeError(f"{op}: {name} must be an array of numbers or booleans, got {array.dtype}")
    return array


def static_int(op: str, name: str, value: Any) -> int:
    """``value`` as a Python int: an int or NumPy integer (not a bool, float, string or array)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{op}: {name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def static_bool(op: str, name: str, value: Any) -> bool:
    """``value`` as a Python bool: True, False or a NumPy bool (not 0 / 1, strings or arrays: a traced
    value cannot choose a kernel)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{op}: {name} must be True or False, got {value!r} ({type(value).__name__})")


def static_number(op: str, name: str, value: Any, *, positive: bool = False, minimum: float | None = None,
                  optional: bool = True) -> float | None:  # fmt: skip
    """A static real number (None allowed where ``optional``): finite, > 0 if ``positive``, >= ``minimum``
    if given. TypeError for anything else (bools, strings, traced arrays), ValueError for NaN, inf or a
    value out of range."""
    if value is None and optional:
        return None
    number = None
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        number = float(value)
    elif isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and np.issubdtype(value.dtype, np.floating):
        if isinstance(value, jax.core.Tracer):
            raise TypeError(f"{op}: {name} must be a static number (it is compiled into the call), got a traced array")
        number = float(value)
    if number is None:
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__} {value!r:.60}")
    if not np.isfinite(number) or (positive and not number > 0) or (minimum is not None and number < minimum):
        rule = f"a finite number >= {minimum}" if minimum is not None else f"a {'positive ' if positive else ''}finite number"
        raise ValueError(f"{op}: {name} must be {rule}, got {number}")
    return number
