"""The RMSNorm ops: the forward kernel (optionally fused with a per-token e4m3 cast) and the backward
kernel as TileOps, their configurations and named cases, and the public functions re-exported by
:mod:`jax_tilek.norm`.

The TileOps take 2-D tokens ``[T, H]``; the public functions check their arguments, flatten
``[B, T, H]`` into tokens and name the results they want (``outputs``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks
from jax_tilek.norm._kernels import (
    BACKWARD_ALIGN,
    DTYPES,
    FORWARD_ALIGN,
    MAX_HIDDEN,
    MAX_ROWS,
    QUANT_GROUP,
    backward_config,
    backward_ctas,
    forward_blocks_per_sm,
    norm_backward_kernel,
    norm_forward_kernel,
    row_layout,
)
from jax_tilek.norm._reference import backward_reference, forward_reference
from jax_tilek.op import Launch, Rows, Static, TileOp, View, check_impl, config_class, uses, with_vjp
from jax_tilek.quant import formats
from jax_tilek.testing import ArgSpec, random_array

FORWARD_RESULTS = ("out", "norm_input", "rstd", "data", "sf")  # the forward kernel's outputs, in result order
EPS = 1e-6  # the cases' eps


def _named(*_, outputs: tuple[str, ...], **__) -> tuple[str, ...]:
    """An op's result names: the ``outputs`` its caller asked for."""
    return outputs


# ---------------------------------------------------------------------------------------------
# Forward: x [T, H], residual [T, H]?, weight [H]? -> outputs, a subset of FORWARD_RESULTS.


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """The CTAs per SM the forward kernel is compiled for (``__launch_bounds__``)."""

    blocks_per_sm: int


@config_class(ForwardConfig)
def _forward_config(x, residual, weight, **_) -> ForwardConfig:
    """About 88 KB of loads in flight per SM, within the registers (:func:`forward_blocks_per_sm`)."""
    return ForwardConfig(forward_blocks_per_sm(row_layout(x.shape[-1], x.dtype)))


def _forward_shapes(x, residual, weight, *, outputs, sf_layout, **_) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The results' shapes, for x of any leading shape (vmap asks with its batch axis in)."""
    lead, kb = x.shape[:-1], x.shape[-1] // QUANT_GROUP
    shapes = {"out": (x.shape, x.dtype), "norm_input": (x.shape, x.dtype), "rstd": (lead, jnp.float32), "data": (x.shape, jnp.float8_e4m3fn)}
    if sf_layout == "row":
        shapes["sf"] = ((*lead, kb), jnp.float32)
    elif sf_layout:
        shapes["sf"] = formats.sf_storage_shape(sf_layout, (math.prod(lead), kb))
    return tuple(jax.ShapeDtypeStruct(*shapes[name]) for name in outputs)


def _forward_rows(x, residual, weight, *, sf_layout, **_) -> Rows | None:
    """Row-wise, unless the scales are column-major (one storage of all tokens, padded at its end) or
    there are more tokens than the kernel takes (vmap then loops instead of folding)."""
    if sf_layout in ("col", "col_ue8m0") or math.prod(x.shape[:-1]) > MAX_ROWS:
        return None
    return Rows(("x", "residual"), FORWARD_RESULTS)


def _forward_launch(x, residual, weight, *, eps, out_scale, outputs, sf_layout, round_sf, config: ForwardConfig) -> Launch:
    t, h = x.shape
    views = {}
    if sf_layout == "col_ue8m0":  # int32 words seen as their 4 bytes
        kw, tp = formats.sf_storage_shape(sf_layout, (t, h // QUANT_GROUP))[0]
        views["sf"] = View((kw, tp, 4), (4 * tp, 4, 1), dtype=np.uint8)
    return Launch(
        kernel=norm_forward_kernel,
        params=dict(
            hidden=h, dtype=x.dtype.name, has_residual=residual is not None, has_weight=weight is not None,
            with_out="out" in outputs, with_rstd="rstd" in outputs, sf_layout=sf_layout, round_sf=round_sf,
            blocks_per_sm=config.blocks_per_sm,
        ),
        scalars=dict(eps=float(eps), out_scale=float(out_scale)),
        buffers={name: None for name in FORWARD_RESULTS if name not in outputs},
        views=views,
    )  # fmt: skip


_forward_op = TileOp(
    name="norm_forward", launch=_forward_launch, operands=("x", "residual?", "weight?"), results=_named,
    reference=forward_reference, out_shape=_forward_shapes, config=_forward_config, rows=_forward_rows,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Backward: dy [T, H], x [T, H], rstd [T], weight [H]?, residual_grad [T, H]? -> dx (, dw with a weight).


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """The backward kernel's cp.async ring depth (``stages`` row blocks) and its CTAs per SM
    (``__launch_bounds__``). ``ctas_per_sm`` also sets the CTA count (``ctas_per_sm`` per SM of an
    H200), hence the partition dw is summed over: a value other than the heuristic's changes dw's
    last bits (the reference sums in the heuristic's partition)."""

    stages: int
    ctas_per_sm: int


@config_class(BackwardConfig)
def _backward_config(dy, x, rstd, weight, residual_grad, **_) -> BackwardConfig:
    """About 132 KB of rings per SM, as two CTAs when two 2-row rings fit, else one (:func:`backward_config`)."""
    return BackwardConfig(*backward_config(x.shape[-1], x.dtype, residual_grad is not None))


def _backward_shapes(dy, x, rstd, weight, residual_grad, *, outputs, **_) -> tuple[jax.ShapeDtypeStruct, ...]:
    shapes = {"dx": jax.ShapeDtypeStruct(x.shape, x.dtype), "dw": jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)}
    return tuple(shapes[name] for name in outputs)


def _backward_rows(dy, x, rstd, weight, residual_grad, **_) -> Rows | None:
    """Row-wise for dx (dw, a sum over the tokens, is not), within the kernel's token limit."""
    return None if math.prod(x.shape[:-1]) > MAX_ROWS else Rows(("dy", "x", "rstd", "residual_grad"), ("dx",))


def _backward_launch(dy, x, rstd, weight, residual_grad, *, out_scale, outputs, config: BackwardConfig) -> Launch:
    t, h = x.shape
    lay = row_layout(h, x.dtype)
    ctas = backward_ctas(t, lay, config.ctas_per_sm)
    if weight is not None:  # each CTA's partial dw rows
        partial, views = jax.ShapeDtypeStruct((ctas, lay.rows, h), jnp.float32), {}
    else:  # never touched: its view only gives the kernel its CTA count
        partial, views = jax.ShapeDtypeStruct((h,), jnp.float32), {"partial": View((ctas, lay.rows, h), (0, 0, 1))}
    return Launch(
        kernel=norm_backward_kernel,
        params=dict(
            hidden=h, dtype=x.dtype.name, has_weight=weight is not None, has_residual_grad=residual_grad is not None,
            stages=config.stages, ctas_per_sm=config.ctas_per_sm,
        ),
        scalars=dict(out_scale=float(out_scale)),
        buffers={} if weight is not None else {"dw": None},
        views=views,
        workspace={"partial": partial},
    )  # fmt: skip


_backward_op = TileOp(
    name="norm_backward", launch=_backward_launch, operands=("dy", "x", "rstd", "weight?", "residual_grad?"),
    results=_named, reference=backward_reference, out_shape=_backward_shapes, config=_backward_config, rows=_backward_rows,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Named cases: every kernel configuration the GPU tests and the benchmarks run. A few small ones run
# the whole contract on the CPU; the GPU tests' other configurations (prefix "gpu_", most at their
# sizes of thousands of tokens) and the benchmarks' (prefix "bench_") are only traced and lowered there.


def _spec(name: str, args: tuple, kwargs: dict, **options) -> ArgSpec:
    """A case; the GPU tests' large ones (``gpu_*``) and the benchmarks' (``bench_*``) are traced only."""
    return ArgSpec(name, args, kwargs, bench=name.startswith(("gpu_", "bench_")), **options)


def _tolerance(dtype, bf16: float | None, f32: float | None) -> float | None:
    return bf16 if jnp.dtype(dtype) == jnp.bfloat16 else f32


def _tokens(t: int, h: int, dtype, residual: bool, weight: bool, lead: tuple[int, ...] = ()):
    """(x, weight or None, residual or None) as structs."""
    x = jax.ShapeDtypeStruct((*lead, t, h), dtype)
    return x, (jax.ShapeDtypeStruct((h,), dtype) if weight else None), (x if residual else None)


def _name(prefix: str, t: int, h: int, dtype, lead=(), **flags) -> str:
    shape = "x".join(map(str, (*lead, t, h)))
    return "_".join([prefix, jnp.dtype(dtype).name, shape, *(f for f, on in flags.items() if on)])


def _forward_case(t, h, dtype, residual=True, weight=True, with_rstd=True, out_scale=1.0, lead=(), kind="forward", name=None, config=None):
    """A norm_forward case. f32: XLA contracts the reference's squares into their sum (FMA), so it
    differs from the kernel in the last place."""
    x, w, r = _tokens(t, h, dtype, residual, weight, lead)
    name = name or _name(kind, t, h, dtype, lead, residual=residual, noweight=not weight, rstd=with_rstd)
    kwargs = dict(out_scale=out_scale, with_rstd=with_rstd)
    return _spec(name, (x, w, EPS, r), kwargs, config=config or {}, tolerance=_tolerance(dtype, None, 1e-5))


# (use_tma_aligned_col_major_sf, round_sf, use_packed_ue8m0) of each scale layout the cases take
SF_FLAGS = {"row": (False, False, False), "row_round": (False, True, False), "col": (True, False, False),
            "col_round": (True, True, False), "col_ue8m0": (True, True, True)}  # fmt: skip


def _cast_case(t, h, dtype, layout, with_out, with_rstd, residual=True, weight=True, lead=(), kind="cast", name=None):
    """A norm_forward_and_per_token_cast case. f32: the reference's y may differ from the kernel's in
    the last place (see :func:`_forward_case`), and the e4m3 cast of it then by one step (1/8)."""
    x, w, r = _tokens(t, h, dtype, residual, weight, lead)
    col, round_sf, packed = SF_FLAGS[layout]
    name = name or _name(kind, t, h, dtype, lead, **{layout: True}, residual=residual, noweight=not weight, out=with_out, rstd=with_rstd)
    kwargs = dict(use_tma_aligned_col_major_sf=col, round_sf=round_sf, use_packed_ue8m0=packed, with_out_bf16=with_out, with_rstd=with_rstd)
    return _spec(name, (x, w, EPS, "e4m3", QUANT_GROUP, r), kwargs, tolerance=_tolerance(dtype, None, 0.13))


def _backward_values(rng: np.random.Generator, out_grad, x, weight, rstd, residual_out_grad) -> tuple:
    """Random values, with ``rstd`` that of ``x`` (x·rstd of unit scale, as the forward makes it)."""
    dy, x, weight, _, rg = (None if s is None else random_array(rng, s.shape, s.dtype) for s in (out_grad, x, weight, rstd, residual_out_grad))
    xf = np.asarray(x, np.float32)
    return dy, x, weight, (1 / np.sqrt(np.mean(xf * xf, axis=-1) + EPS)).astype(np.float32), rg


def _backward_case(t, h, dtype, weight=True, residual_grad=True, out_scale=1.0, kind="backward", name=None, config=None):
    """A norm_backward case. XLA contracts the products inside the reference's row sums (FMA): dx may
    differ from the kernel's in the last place (dw is bit-exact)."""
    dy, w, rg = _tokens(t, h, dtype, residual_grad, weight)
    name = name or _name(kind, t, h, dtype, noweight=not weight, residual_grad=residual_grad)
    args = (dy, dy, w, jax.ShapeDtypeStruct((t,), jnp.float32), rg)
    return _spec(name, args, dict(out_scale=out_scale), make=_backward_values, config=config or {}, tolerance=_tolerance(dtype, 1e-2, 1e-4))


def _rms_norm_case(t, h, dtype, residual=True, weight=True, out_scale=1.0):
    x, w, r = _tokens(t, h, dtype, residual, weight)
    name = _name("rms_norm", t, h, dtype, residual=residual, noweight=not weight)
    return _spec(name, (x, w, EPS, r), dict(out_scale=out_scale), tolerance=_tolerance(dtype, None, 1e-5))


BF16, F32 = jnp.bfloat16, jnp.float32

FORWARD_SPECS = (
    _forward_case(7, 2048, BF16),
    _forward_case(5, 4096, BF16, lead=(8,)),  # [B, T, H]
    _forward_case(7, 128, F32, residual=False),
    _forward_case(1, 7168, BF16, weight=False, with_rstd=False, out_scale=1.5, kind="gpu"),
    _forward_case(7, 384, BF16, kind="gpu"),
    _forward_case(0, 7168, BF16, kind="gpu"),
    _forward_case(1, 4096, F32, out_scale=2.0, kind="gpu"),
    _forward_case(4101, 128, BF16, out_scale=2.0, kind="gpu"),
    _forward_case(4101, 4096, BF16, residual=False, out_scale=0.5, kind="gpu"),
    _forward_case(4101, 7168, BF16, kind="gpu"),
    _forward_case(4101, 2048, F32, weight=False, kind="gpu"),
    _forward_case(4101, 7168, F32, kind="gpu"),
    _forward_case(16384, 7168, BF16, with_rstd=False, name="bench_forward_residual_16384x7168"),
    _forward_case(65536, 4096, BF16, residual=False, with_rstd=False, name="bench_forward_65536x4096"),
    *(
        _forward_case(16384, 7168, BF16, with_rstd=False, name=f"bench_forward_residual_16384x7168_blocks{n}", config=dict(blocks_per_sm=n))
        for n in (2, 4)
    ),
)  # fmt: skip

CAST_SPECS = (
    _cast_case(7, 4096, BF16, "col", with_out=True, with_rstd=False, residual=False),
    _cast_case(7, 96, BF16, "col_ue8m0", with_out=True, with_rstd=True),
    _cast_case(5, 4096, BF16, "row_round", with_out=False, with_rstd=False, lead=(8,)),  # [B, T, H]
    _cast_case(1, 2048, BF16, "row_round", with_out=True, with_rstd=True, weight=False, kind="gpu"),
    _cast_case(7, 4096, F32, "row", with_out=True, with_rstd=True, kind="gpu"),
    _cast_case(0, 7168, BF16, "col_ue8m0", with_out=False, with_rstd=False, kind="gpu"),
    _cast_case(4101, 7168, BF16, "row", with_out=True, with_rstd=True, kind="gpu"),
    _cast_case(4101, 7168, BF16, "col_ue8m0", with_out=False, with_rstd=False, kind="gpu"),
    _cast_case(4101, 128, BF16, "col_round", with_out=True, with_rstd=False, kind="gpu"),
    _cast_case(16384, 7168, BF16, "col_ue8m0", with_out=False, with_rstd=False, name="bench_forward_cast_col_ue8m0_16384x7168"),
    _cast_case(4096, 7168, BF16, "col_ue8m0", with_out=False, with_rstd=False, name="bench_forward_cast_col_ue8m0_4096x7168"),
    _cast_case(65536, 4096, BF16, "row", with_out=True, with_rstd=False, name="bench_forward_cast_row_out_65536x4096"),
)  # fmt: skip

BACKWARD_SPECS = (
    _backward_case(7, 2048, BF16, residual_grad=False, out_scale=2.0),
    _backward_case(0, 7168, BF16),
    _backward_case(16, 256, BF16, weight=False),
    _backward_case(7, 128, F32, residual_grad=False),
    _backward_case(1, 7168, BF16, residual_grad=False, kind="gpu"),
    _backward_case(7, 384, BF16, kind="gpu"),
    _backward_case(1, 2048, F32, weight=False, residual_grad=False, out_scale=0.5, kind="gpu"),
    _backward_case(4101, 128, BF16, kind="gpu"),
    _backward_case(4101, 4096, BF16, weight=False, kind="gpu"),
    _backward_case(4101, 7168, BF16, kind="gpu"),
    _backward_case(4101, 4096, F32, kind="gpu"),
    _backward_case(4101, 7168, F32, kind="gpu"),
    _backward_case(16384, 7168, BF16, name="bench_backward_residual_16384x7168"),
    _backward_case(4096, 4096, BF16, residual_grad=False, name="bench_backward_4096x4096"),
    _backward_case(65536, 4096, BF16, name="bench_backward_residual_65536x4096"),
    *(
        _backward_case(t, h, BF16, name=f"bench_backward_residual_{t}x{h}_ctas{c}_stages{s}", config=dict(ctas_per_sm=c, stages=s))
        for t, h, tunings in ((16384, 7168, ((2, 2), (1, 4))), (65536, 4096, ((2, 4), (3, 2))))
        for c, s in tunings
    ),
)  # fmt: skip

RMS_NORM_SPECS = (
    _rms_norm_case(24, 256, BF16, out_scale=1.5),
    _rms_norm_case(8, 128, BF16, residual=False, weight=False),
)


# ---------------------------------------------------------------------------------------------
# Public functions.


def _check(op: str, x: jax.Array, weight: jax.Array | None, residual: jax.Array | None, align: int) -> None:
    if x.ndim not in (2, 3):
        raise ValueError(f"{op}: x must be [T, H] or [B, T, H], got shape {x.shape}")
    if jnp.dtype(x.dtype) not in DTYPES:
        raise ValueError(f"{op}: x must be bfloat16 or float32, got {x.dtype}")
    h = x.shape[-1]
    if h % align or not align <= h <= MAX_HIDDEN:
        raise ValueError(f"{op}: the hidden size H must be a multiple of {align} in [{align}, {MAX_HIDDEN}], got {h}")
    if math.prod(x.shape[:-1]) > MAX_ROWS:
        raise ValueError(f"{op}: x may have at most {MAX_ROWS} tokens (B·T; the kernels index rows with int32), got {math.prod(x.shape[:-1])}")
    if weight is not None and (tuple(weight.shape) != (h,) or weight.dtype != x.dtype):
        raise ValueError(f"{op}: weight must be [H] = [{h}] in x's dtype {x.dtype}, got {weight.shape} {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"{op}: residual must match x ({x.shape} {x.dtype}), got {residual.shape} {residual.dtype}")


def _forward_inputs(op: str, x, weight, residual, eps, out_scale, impl, align: int):
    """The forward functions' arguments checked: (x, weight, residual) as arrays, eps (finite, >= 0)
    and out_scale (finite) as floats."""
    check_impl(impl, op)
    eps = checks.static_number(op, "eps", eps, minimum=0.0, optional=False)
    out_scale = checks.static_number(op, "out_scale", out_scale, optional=False)
    x = checks.as_array(op, "x", x)
    weight, residual = checks.as_array(op, "weight", weight, optional=True), checks.as_array(op, "residual", residual, optional=True)
    _check(op, x, weight, residual, align)
    return x, weight, residual, eps, out_scale


def _tokens_of(a: jax.Array | None, h: int) -> jax.Array | None:
    return None if a is None else a.reshape(-1, h)


def _forward(op: TileOp, x, residual, weight, *, impl, eps, out_scale, with_out=True, with_rstd=False, sf_layout="", round_sf=False) -> dict:
    """The forward op on x's tokens: its results by name (out; norm_input with a residual; rstd; data and
    sf with a cast) in x's leading shape (sf: row-major ``[..., T, H/32]``, or the storage of all tokens)."""
    wanted = (with_out, residual is not None, with_rstd, bool(sf_layout), bool(sf_layout))
    outputs = tuple(name for name, want in zip(FORWARD_RESULTS, wanted) if want)
    lead, h = x.shape[:-1], x.shape[-1]
    results = op(
        _tokens_of(x, h), _tokens_of(residual, h), weight, impl=impl, eps=eps, out_scale=out_scale, outputs=outputs,
        sf_layout=sf_layout, round_sf=round_sf,
    )  # fmt: skip
    shapes = {"out": x.shape, "norm_input": x.shape, "rstd": lead, "data": x.shape}
    if sf_layout == "row":
        shapes["sf"] = (*lead, h // QUANT_GROUP)
    return {name: a.reshape(shapes[name]) if name in shapes else a for name, a in zip(outputs, results)}


@uses(_forward_op, cases=FORWARD_SPECS)
def norm_forward(
    x: jax.Array,
    weight: jax.Array | None,
    eps: float,
    residual: jax.Array | None = None,
    out_scale: float = 1.0,
    with_rstd: bool = False,
    *,
    impl=None,
    ops,
):
    """RMSNorm with an optional residual add: ``(out, rstd | None, norm_input)``.

    Args:
      x: ``[T, H]`` or ``[B, T, H]``, bf16 or fp32; H % 16 == 0, H <= 8192.
      weight: ``[H]`` in x's dtype, or None (unit weight).
      eps: added to the mean square (a finite number >= 0).
      residual: like x, added to x first (in fp32, rounded to x's dtype).
      out_scale: multiplies the weight (in fp32).
      with_rstd: also return ``rstd`` (fp32, x's shape without H), as the backward needs.
      impl: None (kernel on Hopper/Blackwell, reference elsewhere), ``"tilelang"`` or ``"xla"``.

    Returns:
      ``out`` (like x), ``rstd`` or None, and ``norm_input = round(x + residual)`` (x itself without a
      residual). See :mod:`jax_tilek.norm` for the exact operation order.
    """
    op = "norm_forward"
    x, weight, residual, eps, out_scale = _forward_inputs(op, x, weight, residual, eps, out_scale, impl, FORWARD_ALIGN)
    with_rstd = checks.static_bool(op, "with_rstd", with_rstd)
    outs = _forward(ops[0], x, residual, weight, impl=impl, eps=eps, out_scale=out_scale, with_rstd=with_rstd)
    return outs["out"], outs.get("rstd"), outs.get("norm_input", x)


@uses(_forward_op, cases=CAST_SPECS)
def norm_forward_and_per_token_cast(
    x: jax.Array,
    weight: jax.Array | None,
    eps: float,
    fmt: str = "e4m3",
    num_per_channels: int = QUANT_GROUP,
    residual: jax.Array | None = None,
    out_scale: float = 1.0,
    use_tma_aligned_col_major_sf: bool = False,
    round_sf: bool = False,
    use_packed_ue8m0: bool = False,
    with_out_bf16: bool = False,
    with_rstd: bool = False,
    *,
    impl=None,
    ops,
):
    """RMSNorm (as :func:`norm_forward`) fused with a per-token e4m3 cast of its output:
    ``((data, sf), out_bf16 | None, rstd | None, norm_input)``.

    Only ``fmt="e4m3"`` with ``num_per_channels=32`` (TileKernels' rule); H % 32 == 0. ``data`` is
    float8_e4m3fn like x; ``sf`` follows the layout flags (:func:`formats.sf_layout`): row-major fp32
    ``[..., T, H/32]``, or the column-major storage of all ``B*T`` tokens (``[H/32, align(B*T, 4)]``
    fp32, or packed UE8M0 int32 ``[ceil(H/128), align(B*T, 4)]``), padding zero. The result equals
    ``per_token_cast`` of ``norm_forward``'s output bit for bit. ``out_bf16`` (``with_out_bf16``) is
    that output, in x's dtype. TileKernels' ``mega_moe_sf`` output is not provided.
    """
    op = "norm_forward_and_per_token_cast"
    x, weight, residual, eps, out_scale = _forward_inputs(op, x, weight, residual, eps, out_scale, impl, QUANT_GROUP)
    if not (isinstance(fmt, str) and fmt == "e4m3"):
        raise ValueError(f"{op}: fmt must be 'e4m3' (use norm_forward unquantized), got {fmt!r:.60}")
    if checks.static_int(op, "num_per_channels", num_per_channels) != QUANT_GROUP:
        raise ValueError(f"{op}: num_per_channels must be {QUANT_GROUP}, got {num_per_channels}")
    col, packed, round_sf, with_out_bf16, with_rstd = (checks.static_bool(op, n, v) for n, v in (
        ("use_tma_aligned_col_major_sf", use_tma_aligned_col_major_sf), ("use_packed_ue8m0", use_packed_ue8m0),
        ("round_sf", round_sf), ("with_out_bf16", with_out_bf16), ("with_rstd", with_rstd),
    ))  # fmt: skip
    layout = formats.sf_layout(col, packed, round_sf, op=op)
    outs = _forward(
        ops[0], x, residual, weight, impl=impl, eps=eps, out_scale=out_scale, with_out=with_out_bf16, with_rstd=with_rstd,
        sf_layout=layout, round_sf=round_sf,
    )  # fmt: skip
    return (outs["data"], outs["sf"]), outs.get("out"), outs.get("rstd"), outs.get("norm_input", x)


def _backward(op: TileOp, out_grad, x, weight, rstd, residual_out_grad, *, impl, out_scale: float):
    """The backward op on x's tokens: ``(x_grad, weight_grad | None)``."""
    h = x.shape[-1]
    outputs = ("dx", "dw") if weight is not None else ("dx",)
    results = op(
        _tokens_of(out_grad, h), _tokens_of(x, h), rstd.reshape(-1), weight, _tokens_of(residual_out_grad, h),
        impl=impl, out_scale=out_scale, outputs=outputs,
    )  # fmt: skip
    return results[0].reshape(x.shape), (results[1] if weight is not None else None)


@uses(_backward_op, cases=BACKWARD_SPECS)
def norm_backward(
    out_grad: jax.Array,
    x: jax.Array,
    weight: jax.Array | None,
    rstd: jax.Array,
    residual_out_grad: jax.Array | None = None,
    out_scale: float = 1.0,
    *,
    impl=None,
    ops,
):
    """The RMSNorm backward: ``(x_grad, weight_grad | None)``.

    Args:
      out_grad: the gradient of ``out``, like x.
      x: the forward's ``norm_input``, ``[T, H]`` or ``[B, T, H]``, bf16 or fp32; H % 32 == 0, H <= 8192.
      weight: ``[H]`` in x's dtype, or None.
      rstd: fp32, x's shape without H (the forward's ``rstd``).
      residual_out_grad: the gradient of ``norm_input`` (like x), added to ``x_grad``.
      out_scale: as in the forward.
      impl: None (kernel on Hopper/Blackwell, reference elsewhere), ``"tilelang"`` or ``"xla"``.

    Returns:
      ``x_grad`` like x, and ``weight_grad`` fp32 ``[H]`` (None without a weight), reduced over tokens
      in a fixed order that depends on the shapes only (the same bits on every GPU).
    """
    op = "norm_backward"
    check_impl(impl, op)
    out_scale = checks.static_number(op, "out_scale", out_scale, optional=False)
    out_grad, x, weight, rstd, residual_out_grad = (
        checks.as_array(op, name, value, optional=name in ("weight", "residual_out_grad"))
        for name, value in (("out_grad", out_grad), ("x", x), ("weight", weight), ("rstd", rstd), ("residual_out_grad", residual_out_grad))
    )  # fmt: skip
    _check(op, x, weight, residual_out_grad, BACKWARD_ALIGN)
    if out_grad.shape != x.shape or out_grad.dtype != x.dtype:
        raise ValueError(f"{op}: out_grad must match x ({x.shape} {x.dtype}), got {out_grad.shape} {out_grad.dtype}")
    if rstd.shape != x.shape[:-1] or rstd.dtype != jnp.float32:
        raise ValueError(f"{op}: rstd must be float32 {x.shape[:-1]}, got {rstd.shape} {rstd.dtype}")
    return _backward(ops[0], out_grad, x, weight, rstd, residual_out_grad, impl=impl, out_scale=out_scale)


def _rms_norm_primal(x, weight, residual, *, impl=None, eps, out_scale, ops):
    outs = _forward(ops[0], x, residual, weight, impl=impl, eps=eps, out_scale=out_scale)
    return outs["out"] if residual is None else (outs["out"], outs["norm_input"])


def _rms_norm_fwd(x, weight, residual, *, impl=None, eps, out_scale, ops):
    outs = _forward(ops[0], x, residual, weight, impl=impl, eps=eps, out_scale=out_scale, with_rstd=True)
    output = outs["out"] if residual is None else (outs["out"], outs["norm_input"])
    return output, (outs.get("norm_input", x), weight, outs["rstd"], Static(residual is not None))


def _rms_norm_bwd(residuals, g, *, impl=None, eps, out_scale, ops):
    norm_input, weight, rstd, has_residual = residuals
    d_out, d_norm_input = g if has_residual.value else (g, None)
    dx, dw = _backward(ops[1], d_out, norm_input, weight, rstd, d_norm_input, impl=impl, out_scale=out_scale)
    return dx, (None if weight is None else dw.astype(weight.dtype)), (dx if has_residual.value else None)


_rms_norm = with_vjp(_rms_norm_primal, _rms_norm_fwd, _rms_norm_bwd)


@uses(_forward_op, _backward_op, cases=RMS_NORM_SPECS, differentiable=True)
def rms_norm(
    x: jax.Array,
    weight: jax.Array | None,
    eps: float,
    residual: jax.Array | None = None,
    out_scale: float = 1.0,
    *,
    impl=None,
    ops,
):
    """Differentiable RMSNorm: ``out``, or ``(out, norm_input)`` with a residual.

    The forward is :func:`norm_forward`, the backward :func:`norm_backward` (straight through the
    rounding of ``norm_input``); gradients flow to x, weight and residual. H % 32 == 0 (the backward's
    rule). ``impl="xla"`` differentiates the JAX reference instead.
    """
    x, weight, residual, eps, out_scale = _forward_inputs("rms_norm", x, weight, residual, eps, out_scale, impl, BACKWARD_ALIGN)
    return _rms_norm(x, weight, residual, impl=impl, eps=eps, out_scale=out_scale, ops=ops)


