"""The contract of every public op, swept over misuse (no GPU needed).

For each op the table below gives one good call (arrays as ``jax.ShapeDtypeStruct``, options as
keywords) and explicit bad variants; the sweep adds generic ones: every array argument replaced by
Python objects, given other dtypes, ranks, and zero or huge extents, and every option replaced by an
arbitrary object. Each variant must either

- raise a ``TypeError`` or ``ValueError`` at trace time (``jax.eval_shape``) whose message starts with
  the op's name and names the argument (explicit variants: the arguments they list), or
- trace, and then also lower for platform "cuda" (kernels compiled for sm_90a, no memory needed):
  whatever ``eval_shape`` accepts must launch, never fail later with a grid or 32-bit limit.

To cover another op, add a :class:`Case`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest

from jax_tilek.quant import (
    cast,
    per_block_cast,
    per_block_cast_lossless,
    per_block_cast_with_precomputed_sf,
    per_block_cast_with_sf_only,
    per_channel_cast,
    per_channel_cast_and_transpose,
    per_channel_cast_fused,
)
from jax_tilek.transpose import batched_transpose, transpose

from jax_tilek.testing import lower_for_cuda

S = jax.ShapeDtypeStruct


@dataclasses.dataclass(frozen=True)
class Bad:
    """A misuse: positional arguments replaced (by index), options replaced or added, and the argument
    names the error must mention (each a name, or a tuple of names of which one suffices)."""

    label: str
    args: dict[int, Any] = dataclasses.field(default_factory=dict)
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Case:
    """One public op: ``fn(*args, **kwargs)`` is a good call; ``names`` name the positional arguments
    as the op's errors do."""

    op: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    names: tuple[str, ...]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    bad: tuple[Bad, ...] = ()
    label: str = ""
    optional: tuple[str, ...] = ()  # arguments for which None is a valid value

    @property
    def id(self) -> str:
        return self.label or self.op


def _pcc_quant(d, s, **kw):
    return per_channel_cast((d, s), **kw)


def _lossless(d, s, **kw):
    return per_block_cast_lossless((d, s), **kw)


CASES = [
    Case(
        "transpose", transpose, (S((128, 256), jnp.float32),), ("x",), dict(columns=(64, 192)),
        bad=(
            Bad("columns-floats", kwargs=dict(columns=(64.0, 192.0)), names=("columns",)),
            Bad("columns-outside", kwargs=dict(columns=(64, 320)), names=("columns",)),
            Bad("int4", args={0: S((128, 256), jnp.int4)}, names=("x",)),
            Bad("rank-3", args={0: S((1, 128, 256), jnp.float32)}, names=("x",)),
        ),
    ),
    Case(
        "batched_transpose", batched_transpose, (S((2, 128, 192), jnp.bfloat16),), ("x",),
        bad=(
            Bad("uint4", args={0: S((2, 128, 192), jnp.uint4)}, names=("x",)),
            Bad("float4", args={0: S((2, 128, 192), jnp.float4_e2m1fn)}, names=("x",)),
            Bad("M-96", args={0: S((2, 96, 192), jnp.bfloat16)}, names=("M",)),
            Bad("columns-int", kwargs=dict(columns=64), names=("columns",)),
        ),
    ),
    Case(
        "cast", cast, (S((7, 13), jnp.float32),), ("x",), dict(dtype="bfloat16", stochastic_rounding=False),
        bad=(
            Bad("dtype-int8", kwargs=dict(dtype="int8"), names=("dtype",)),
            Bad("sr-float16", kwargs=dict(dtype="float16", stochastic_rounding=True), names=("stochastic_rounding",)),
            Bad("seed-without-sr", kwargs=dict(seed=3), names=("seed",)),
            Bad("sr-1", kwargs=dict(stochastic_rounding=1), names=("stochastic_rounding",)),
        ),
    ),
    Case(
        "cast", lambda x, seed, **kw: cast(x, seed=seed, **kw), (S((64, 16), jnp.float32), S((), jnp.uint32)), ("x", "seed"),
        dict(dtype="float8_e4m3fn", stochastic_rounding=True), label="cast-stochastic", optional=("seed",),
        bad=(
            Bad("seed-2^40", args={1: 2**40}, names=("seed",)),
            Bad("seed-float", args={1: S((), jnp.float32)}, names=("seed",)),
            Bad("seed-vector", args={1: S((2,), jnp.uint32)}, names=("seed",)),
            Bad("size-6", args={0: S((6,), jnp.float32)}, names=("x.size",)),
        ),
    ),
    Case(
        "per_block_cast", per_block_cast, (S((131, 576), jnp.bfloat16),), ("x",),
        dict(fmt="e4m3", block_size=(32, 32), use_tma_aligned_col_major_sf=True, round_sf=True, use_packed_ue8m0=True),
        bad=(
            Bad("block-floats", kwargs=dict(block_size=(32.0, 32.0)), names=("block_size",)),
            Bad("block-0", kwargs=dict(block_size=(0, 128)), names=("block_size",)),
            Bad("block-int", kwargs=dict(block_size=32), names=("block_size",)),
            Bad("fmt-e5m6", kwargs=dict(fmt="e5m6"), names=("fmt",)),
            Bad("packed-without-round", kwargs=dict(round_sf=False), names=("use_packed_ue8m0", "round_sf")),
            Bad("hidden-96", args={0: S((4, 96), jnp.bfloat16)}, names=("x.shape[1]",)),
        ),
    ),
    Case(
        "per_block_cast_with_sf_only", per_block_cast_with_sf_only, (S((131, 576), jnp.bfloat16),), ("x",),
        dict(fmt="e4m3", block_size=(128, 128), use_tma_aligned_col_major_sf=True, round_sf=True, use_packed_ue8m0=True),
        bad=(Bad("block-mixed", kwargs=dict(block_size=(128, 128.0)), names=("block_size",)),),
    ),
    Case(
        "per_block_cast_with_precomputed_sf",
        lambda x, sf, **kw: per_block_cast_with_precomputed_sf(x, sf=sf, **kw),
        (S((131, 576), jnp.bfloat16), S((2, 5), jnp.float32)), ("x", "sf"), dict(fmt="e4m3", block_size=(128, 128)),
        bad=(
            Bad("sf-shape", args={1: S((2, 4), jnp.float32)}, names=("sf",)),
            Bad("sf-col", kwargs=dict(use_tma_aligned_col_major_sf=True), names=("sf",)),
        ),
    ),
    Case(
        "per_block_cast_lossless", _lossless, (S((131, 1040), jnp.uint8), S((131, 65), jnp.float32)), ("x's data", "x's scales"),
        dict(fmt="e4m3", x_block_size=(1, 32), out_block_size=(1, 128), x_sf_layout="row"),
        bad=(
            Bad("x-block-0", kwargs=dict(x_block_size=(0, 128)), names=("x_block_size",)),
            Bad("x-block-floats", kwargs=dict(x_block_size=(1.0, 32.0)), names=("x_block_size",)),
            Bad("out-block-not-multiple", kwargs=dict(out_block_size=(1, 64), x_block_size=(1, 128)), names=("out_block_size",)),
            Bad("fmt-e2m1", kwargs=dict(fmt="e2m1"), names=("fmt",)),
            Bad("sf-layout", kwargs=dict(x_sf_layout="col"), names=("x's scales",)),
        ),
    ),
    Case(
        "per_channel_cast", per_channel_cast, (S((256, 1152), jnp.bfloat16),), ("x",), dict(num_per_tokens=32, round_sf=False),
        bad=(
            Bad("npt-float", kwargs=dict(num_per_tokens=32.0), names=("num_per_tokens",)),
            Bad("npt-64", kwargs=dict(num_per_tokens=64), names=("num_per_tokens",)),
            Bad("tokens-192", args={0: S((192, 1152), jnp.bfloat16)}, names=("num_tokens",)),
            Bad("npc-bf16", kwargs=dict(num_per_channels=128), names=("num_per_channels",)),
            Bad("sf-layout-bf16", kwargs=dict(x_sf_layout="row"), names=("x_sf_layout",)),
            Bad("sf-layout-object", kwargs=dict(x_sf_layout=object()), names=("x_sf_layout",)),
        ),
    ),
    Case(
        "per_channel_cast", _pcc_quant, (S((256, 7168), jnp.float8_e4m3fn), S((256, 56), jnp.float32)), ("x's data", "x's sf"),
        dict(num_per_tokens=128, num_per_channels=128, x_sf_layout="row"), label="per_channel_cast-quant",
        bad=(
            Bad("npc-64", kwargs=dict(num_per_channels=64), names=("num_per_channels",)),
            Bad("sf-shape", args={1: S((256, 55), jnp.float32)}, names=("sf",)),
        ),
    ),
    Case(
        "per_channel_cast_fused", lambda x, pos, **kw: per_channel_cast_fused(x, pos_to_token=pos, **kw),
        (S((200, 7168), jnp.bfloat16), S((272,), jnp.int32)), ("x", "pos_to_token"), dict(round_sf=False), optional=("pos_to_token",),
        bad=(
            Bad("pos-uint32", args={1: S((272,), jnp.uint32)}, names=("pos_to_token",)),
            Bad("pos-length", args={1: S((40,), jnp.int32)}, names=("pos_to_token",)),
            Bad("pos-list", args={1: [0] * 16}, names=("pos_to_token",)),
        ),
    ),
    Case(
        "per_channel_cast_and_transpose", per_channel_cast_and_transpose, (S((128, 7168), jnp.bfloat16),), ("x",),
        dict(num_per_tokens=32),
        bad=(Bad("npt-16", kwargs=dict(num_per_tokens=16), names=("num_per_tokens",)),),
    ),
]  # fmt: skip

# Generic misuse of an array argument.
OBJECTS = {"list": [[0.0] * 8] * 8, "None": None, "str": "x", "object": object(), "dict": {}}
DTYPES = ["bool", "int8", "uint8", "int32", "float16", "bfloat16", "float32", "float8_e4m3fn", "int4", "float4_e2m1fn", "complex64"]
EXTENTS = [0, 2**31, 65537 * 64]


def _is_array(a) -> bool:
    return isinstance(a, jax.ShapeDtypeStruct)


def _variants(case: Case):
    """(label, args, kwargs, argument names the error must mention) of every variant of a case."""
    yield "good", case.args, case.kwargs, ()
    for bad in case.bad:
        args = tuple(bad.args.get(i, a) for i, a in enumerate(case.args))
        yield bad.label, args, {**case.kwargs, **bad.kwargs}, bad.names
    for i, (a, name) in enumerate(zip(case.args, case.names)):
        if not _is_array(a):
            continue

        def replaced(value, i=i):
            return tuple(value if j == i else b for j, b in enumerate(case.args))

        for label, value in OBJECTS.items():
            if not (value is None and name in case.optional):
                yield f"{name}={label}", replaced(value), case.kwargs, (name,)
        # A changed array may no longer match the others: then naming any of them is right.
        either = (tuple(n for n, b in zip(case.names, case.args) if _is_array(b)),)
        for dtype in DTYPES:
            if jnp.dtype(dtype) != a.dtype:
                yield f"{name}:{dtype}", replaced(S(a.shape, dtype)), case.kwargs, either
        yield f"{name}:rank+1", replaced(S((2, *a.shape), a.dtype)), case.kwargs, either
        if a.ndim:
            yield f"{name}:rank-1", replaced(S(a.shape[1:], a.dtype)), case.kwargs, either
        for axis in range(a.ndim):
            for extent in EXTENTS:
                shape = tuple(extent if k == axis else d for k, d in enumerate(a.shape))
                yield f"{name}:axis{axis}={extent}", replaced(S(shape, a.dtype)), case.kwargs, either
    for key in [*case.kwargs, "impl"]:
        yield f"{key}=object", case.args, {**case.kwargs, key: object()}, (key,)


def _trace(case: Case, args, kwargs):
    """jax.eval_shape of the call, arrays as abstract arguments and everything else as constants."""
    positions = [i for i, a in enumerate(args) if _is_array(a)]

    def fn(*arrays):
        full = list(args)
        for i, x in zip(positions, arrays):
            full[i] = x
        return case.fn(*full, **kwargs)

    return fn, [args[i] for i in positions]


def _names(message: str, name: str) -> bool:
    """Whether the message names ``name`` as a word (``x`` in "x's dtype" or "x must", not in "max")."""
    return re.search(rf"(?<![\w']){re.escape(name)}(?!\w)", message) is not None


SWEEP = [(case, *variant) for case in CASES for variant in _variants(case)]


@pytest.mark.parametrize("case,label,args,kwargs,names", SWEEP, ids=[f"{c.id}-{v[0]}" for c, *v in SWEEP])
def test_contract(case, label, args, kwargs, names):
    fn, arrays = _trace(case, args, kwargs)
    try:
        jax.eval_shape(fn, *arrays)
    except (TypeError, ValueError) as e:
        message = str(e).split("\n--------------------\n")[0]  # without JAX's traceback note
        assert label != "good", f"the good call raised: {message}"
        assert message.startswith(f"{case.op}: "), f"the error does not start with the op's name: {type(e).__name__}: {message}"
        # Each entry of ``names`` is a name, or a tuple of names of which one suffices.
        missing = [n for n in names if not any(_names(message, m) for m in ((n,) if isinstance(n, str) else n))]
        assert not missing, f"the error does not name {missing}: {message}"
        return
    except Exception as e:  # noqa: BLE001 - anything else is a failure of the contract
        pytest.fail(f"{type(e).__name__} instead of a TypeError or ValueError: {e}")
    assert label not in {b.label for b in case.bad}, f"the misuse {label!r} was accepted"
    _lower(case, label, fn, arrays)


def _lower(case: Case, label: str, fn, arrays) -> None:
    """eval_shape accepted the call: it must lower for "cuda" too."""
    try:
        lower_for_cuda(fn, *arrays)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"eval_shape accepted {case.id} ({label}) but lowering for cuda failed: {type(e).__name__}: {e}")


def test_the_sweep_covers_every_case():
    assert {c.op for c in CASES} >= {
        "transpose", "batched_transpose", "cast", "per_block_cast", "per_block_cast_with_sf_only",
        "per_block_cast_with_precomputed_sf", "per_block_cast_lossless", "per_channel_cast", "per_channel_cast_fused",
        "per_channel_cast_and_transpose",
    }  # fmt: skip
    assert len(SWEEP) > 20 * len(CASES)
