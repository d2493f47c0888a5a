"""Programs named on the command line: ``--program module:function`` with ``--args``.

An argument is an array as ``dtype[d0,d1,...]`` (``bf16[8,1024,2048]``, ``float32[]``; short names
bf16, f16, f32, f64, i8, i16, i32, i64, u8, u16, u32, u64, e4m3, e5m2, bool), or else a Python
literal (``7``, ``None``, ``'e4m3'``) passed as it is. Without ``--args`` the function is a program
factory: ``function()`` returns ``(fn, args)`` or a list of such pairs (args: a sequence of arrays or
``jax.ShapeDtypeStruct``s), for programs whose arguments are pytrees.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

DTYPE_ALIASES = {
    "bf16": "bfloat16", "f16": "float16", "f32": "float32", "f64": "float64",
    "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64",
    "u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64",
    "e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2",
}  # fmt: skip
_ARRAY = re.compile(r"^\s*([A-Za-z0-9_]+)\s*\[\s*([0-9,\s]*)\]\s*$")

Program = tuple[Callable[..., Any], Sequence[Any]]


def parse_arg(text: str) -> Any:
    """``dtype[shape]`` as a ``jax.ShapeDtypeStruct``, else a Python literal; ValueError otherwise."""
    match = _ARRAY.match(text)
    if match:
        name = DTYPE_ALIASES.get(match.group(1), match.group(1))
        try:
            dtype = jnp.dtype(name)
        except TypeError:
            raise ValueError(f"--args {text!r}: unknown dtype {match.group(1)!r}") from None
        shape = tuple(int(d) for d in match.group(2).split(",") if d.strip())
        return jax.ShapeDtypeStruct(shape, dtype)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"--args {text!r} is neither dtype[shape] (e.g. bf16[4096,7168]) nor a Python literal") from None


def resolve(spec: str) -> Callable[..., Any]:
    """The object ``module:attribute`` names (the current directory is importable, as with ``python -m``)."""
    module, sep, attribute = spec.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"--program {spec!r}: expected module:function (e.g. mypkg.train:train_step)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: Any = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def programs(spec: str, args: Sequence[str] | None) -> list[Program]:
    """The programs ``--program spec [--args ...]`` names (see the module docstring)."""
    fn = resolve(spec)
    if args is not None:
        return [(fn, [parse_arg(a) for a in args])]
    made = fn()
    if isinstance(made, tuple) and len(made) == 2 and callable(made[0]):
        made = [made]
    made = list(made)
    if not all(isinstance(p, tuple) and len(p) == 2 and callable(p[0]) for p in made):
        raise ValueError(f"--program {spec!r} without --args must return (fn, args) or a list of (fn, args)")
    return made
