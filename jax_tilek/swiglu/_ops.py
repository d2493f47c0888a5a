"""The SwiGLU row ops: the forward and backward TileOps over the row kernels (argument rules, launches,
row-wise declarations, named cases) and the un-quantized public functions ``swiglu_forward``,
``swiglu_backward`` (v2.1) and ``swiglu`` (one differentiable function). The per-token FP8 variants of
:mod:`jax_tilek.swiglu._quant` call the same two ops.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks, platform
from jax_tilek.op import Launch, Rows, TileOp, View, check_impl, uses, with_vjp
from jax_tilek.quant import formats as F
from jax_tilek.swiglu._cases import WEIGHT_GRAD_TOLERANCE, case, psum_struct, rows_struct, weights_struct
from jax_tilek.swiglu._kernels import BLOCKS_PER_SM, MAX_HIDDEN, MAX_ROWS, WARPS, swiglu_backward_kernel, swiglu_forward_kernel
from jax_tilek.swiglu._reference import KINDS, OUT_DTYPES, TOKEN_ALIGNMENT, backward_reference, forward_reference
from jax_tilek.testing import PositionalSpec

HIDDEN_ALIGN = 64  # H must be a multiple of this (TileKernels v2.1)
IN_DTYPES = (jnp.bfloat16, jnp.float32)
CAST_BLOCKS = (32, 128)  # the fused casts' (1, npc) scale blocks, besides whole rows (forward only)
MAX_ALIGNMENT = 2**16  # token_alignment: psum ends + alignment stay within int32
MAX_CTAS = 2**13  # CTAs of a persistent launch (JAX_TILEK_NUM_SMS may ask for more): 2^16 warps


# ---------------------------------------------------------------------------------------------
# Argument rules (errors name the public function).


def arrays(name: str, x, psum, topk_weights) -> tuple:
    """The array arguments every SwiGLU op takes, as arrays (None stays None but for x)."""
    return (
        checks.as_array(name, "x", x), checks.as_array(name, "psum_num_tokens_per_expert", psum, optional=True),
        checks.as_array(name, "topk_weights", topk_weights, optional=True),
    )  # fmt: skip


def routing(name: str, routed_scaling_factor, clamp_value, token_alignment) -> dict:
    """The static options every SwiGLU op takes, checked, as the ops' keywords."""
    return dict(
        routed_scaling_factor=checks.static_number(name, "routed_scaling_factor", routed_scaling_factor),
        clamp_value=checks.static_number(name, "clamp_value", clamp_value, positive=True),
        token_alignment=checks.static_int(name, "token_alignment", token_alignment),
    )


def check_rows(name: str, x, psum, topk_weights, *, token_alignment: int, x_dtypes=IN_DTYPES) -> int:
    """Rules shared by the SwiGLU ops; returns H."""
    if x.ndim != 2 or x.shape[1] % 2:
        raise ValueError(f"{name}: x must be [T, 2H], got shape {x.shape}")
    h = x.shape[1] // 2
    if h % HIDDEN_ALIGN or not 0 < h <= MAX_HIDDEN:
        raise ValueError(f"{name}: H (half of x's last dimension, {h}) must be a positive multiple of {HIDDEN_ALIGN}, at most {MAX_HIDDEN}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"{name}: x may have at most {MAX_ROWS} rows (T; the kernels index rows with int32), got {x.shape[0]}")
    if not any(x.dtype == d for d in x_dtypes):
        raise ValueError(f"{name}: x must be {' or '.join(np.dtype(d).name for d in x_dtypes)}, got {x.dtype}")
    if psum is not None and (psum.ndim != 1 or psum.dtype != jnp.int32 or not 1 <= psum.shape[0] < 1 << 16):
        raise ValueError(f"{name}: psum_num_tokens_per_expert must be int32 [E] with 1 <= E < 65536, got {psum.dtype} {psum.shape}")
    if topk_weights is not None and (topk_weights.shape != (x.shape[0],) or topk_weights.dtype != jnp.float32):
        raise ValueError(f"{name}: topk_weights must be float32 [T] = [{x.shape[0]}], got {topk_weights.dtype} {topk_weights.shape}")
    if not 1 <= token_alignment <= MAX_ALIGNMENT:
        raise ValueError(f"{name}: token_alignment must be a positive integer, at most {MAX_ALIGNMENT}, got {token_alignment}")
    return h


def check_fmt(name: str, fmt, choices=tuple(OUT_DTYPES)) -> str:
    """``fmt`` is one of the strings ``choices`` (ValueError naming the op otherwise)."""
    if not (isinstance(fmt, str) and fmt in choices):
        raise ValueError(f"{name}: fmt must be {' or '.join(repr(c) for c in choices)}, got {fmt!r:.60}")
    return fmt


def check_cast(name: str, h: int, num_per_channels: int, sf_layout: str, whole_row: bool = True) -> None:
    """The (1, npc) blocks of a fused per-token cast: 32 or 128, or (``whole_row``) H with row-major scales."""
    num_per_channels = checks.static_int(name, "num_per_channels", num_per_channels)
    if not (num_per_channels in CAST_BLOCKS or (whole_row and num_per_channels == h)):
        rule = f"one of {CAST_BLOCKS}" + (f" or H ({h})" if whole_row else "")
        raise ValueError(f"{name}: num_per_channels must be {rule}, got {num_per_channels}")
    if h % num_per_channels:
        raise ValueError(f"{name}: H ({h}) must be a multiple of num_per_channels ({num_per_channels})")
    if num_per_channels not in CAST_BLOCKS and sf_layout != "row":
        raise ValueError(f"{name}: whole-row scales (num_per_channels == H) need row-major scale factors")


# ---------------------------------------------------------------------------------------------
# Launch helpers.


def words(shape, dtype) -> View:
    """A ``[rows, n]`` array seen as uint32 words ``[rows, n·bits/32]``."""
    return View((shape[0], shape[1] * np.dtype(dtype).itemsize // 4), dtype=np.uint32)


def scalar(value: Optional[float]) -> float:
    """A kernel's fp32 scalar for an optional static number (0 when absent: the kernel ignores it)."""
    return float(np.float32(0.0 if value is None else value))


def persistent_ctas(rows: int) -> int:
    """CTAs of a persistent row kernel (a launch-time value, not part of the compiled kernel):
    ``BLOCKS_PER_SM`` per multiprocessor of the GPU being compiled for, fewer for few rows. Every
    row's result is independent of it, so every GPU computes the same bits with the same cubin."""
    return min(F.ceil_div(rows, WARPS), platform.target_num_sms() * BLOCKS_PER_SM, MAX_CTAS)


def _grid_rows(t: int, sf_layout: Optional[str]) -> int:
    """Rows a row kernel covers: column-major scale storage pads the tokens to a multiple of 4."""
    return F.align(t, 4) if sf_layout not in (None, "row") else t


# ---------------------------------------------------------------------------------------------
# Forward: ``act`` in bf16 / fp32, or its per-token e4m3 cast (fmt "e4m3"), and the clamp counts.


def _forward_name(fmt: str) -> str:
    return "swiglu_forward_and_per_token_cast" if fmt == "e4m3" else "swiglu_forward"


def _forward_check(x, psum, topk_weights, *, fmt, num_per_channels=0, sf_layout=None, token_alignment=TOKEN_ALIGNMENT, **_):
    name = _forward_name(fmt)
    h = check_rows(name, x, psum, topk_weights, token_alignment=token_alignment)
    if fmt == "e4m3":
        check_cast(name, h, num_per_channels, sf_layout)
    else:
        check_fmt(name, fmt)


def _forward_results(*_, fmt, with_clamped_count=False, **__) -> tuple[str, ...]:
    return ("y", "sf")[: 2 if fmt == "e4m3" else 1] + (("clamped_count",) if with_clamped_count else ())


def _forward_rows(x, psum, topk_weights, *, fmt, sf_layout=None, with_clamped_count=False, **_) -> Optional[Rows]:
    """Row-wise, but for the psum layout (it places rows by their index), the clamp counts (sums over
    rows) and column-major scales (one storage row for all tokens)."""
    if psum is not None or with_clamped_count or sf_layout not in (None, "row"):
        return None
    return Rows(("x", "topk_weights"), _forward_results(fmt=fmt))


def _forward_launch(x, psum, topk_weights, *, fmt, num_per_channels=0, sf_layout=None, round_sf=False, routed_scaling_factor=None,
                    clamp_value=None, with_clamped_count=False, token_alignment=TOKEN_ALIGNMENT) -> Launch:  # fmt: skip
    t, h = x.shape[0], x.shape[1] // 2
    cast = fmt == "e4m3"
    return Launch(
        kernel=swiglu_forward_kernel,
        params=dict(
            hidden=h, in_dtype=np.dtype(x.dtype).name, out_kind=fmt, npc=num_per_channels if cast else 0,
            layout=sf_layout if cast else None, round_sf=bool(round_sf), psum=psum is not None, alignment=int(token_alignment),
            weights=topk_weights is not None, rsf=routed_scaling_factor is not None, clamp=clamp_value is not None,
            count=bool(with_clamped_count),
        ),  # fmt: skip
        scalars=dict(clamp_value=scalar(clamp_value), scaling=scalar(routed_scaling_factor), num_ctas=persistent_ctas(_grid_rows(t, sf_layout))),
        buffers={"ps": "psum", "tw": "topk_weights", "sf": "sf" if cast else None, "cnt": "clamped_count" if with_clamped_count else None},
        views={"x": words(x.shape, x.dtype), "y": words((t, h), jnp.float8_e4m3fn if cast else OUT_DTYPES[fmt])},
        zero_fill=("clamped_count",) if with_clamped_count else (),
    )


forward_op = TileOp(
    name="swiglu_forward", launch=_forward_launch, operands=("x", "psum?", "topk_weights?"), results=_forward_results,
    reference=forward_reference, check=_forward_check, rows=_forward_rows,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Backward: x_grad, optionally its per-token e4m3 cast, the weight gradient and the recomputed act.


def _backward_name(x_sf) -> str:
    return "swiglu_backward" if x_sf is None else "swiglu_backward_and_per_token_cast"


def _backward_check(x, act_x_grad, x_sf, psum, topk_weights, *, fmt, num_per_channels=0, x_sf_layout=None, sf_layout=None,
                    token_alignment=TOKEN_ALIGNMENT, **_):  # fmt: skip
    name = _backward_name(x_sf)
    h = check_rows(name, x, psum, topk_weights, token_alignment=token_alignment, x_dtypes=IN_DTYPES if x_sf is None else (jnp.float8_e4m3fn,))
    g = act_x_grad
    if g.shape != (x.shape[0], h) or not any(g.dtype == d for d in IN_DTYPES):
        raise ValueError(f"{name}: act_x_grad must be bf16 or fp32 [T, H] = [{x.shape[0]}, {h}], got {g.dtype} {g.shape}")
    check_fmt(name, fmt)
    if x_sf is not None or sf_layout is not None:
        check_cast(name, h, num_per_channels, sf_layout or "row", whole_row=False)
    if x_sf is not None:
        shape, dtype = F.sf_storage_shape(x_sf_layout, (x.shape[0], 2 * h // num_per_channels))
        if x_sf.shape != shape or x_sf.dtype != dtype:
            raise ValueError(f"{name}: x's scale factors in layout {x_sf_layout!r} must be {np.dtype(dtype).name} {shape}, got {x_sf.dtype} {x_sf.shape}")


def _backward_results(*_, sf_layout=None, with_weight_grad=False, do_recompute=False, **__) -> tuple[str, ...]:
    names = ("x_grad",) + (("x_grad_data", "x_grad_sf") if sf_layout is not None else ())
    return names + (("weight_grad",) if with_weight_grad else ()) + (("act_out",) if do_recompute else ())


def _backward_rows(x, act_x_grad, x_sf, psum, topk_weights, *, x_sf_layout=None, sf_layout=None, **static) -> Optional[Rows]:
    """Row-wise, but for the psum layout and column-major scales (of x or of the gradient's cast)."""
    if psum is not None or x_sf_layout not in (None, "row") or sf_layout not in (None, "row"):
        return None
    return Rows(("x", "act_x_grad", "x_sf", "topk_weights"), _backward_results(sf_layout=sf_layout, **static))


def _backward_launch(x, act_x_grad, x_sf, psum, topk_weights, *, fmt, num_per_channels=0, x_sf_layout=None, sf_layout=None,
                     round_sf=False, routed_scaling_factor=None, clamp_value=None, do_recompute=False, with_weight_grad=False,
                     token_alignment=TOKEN_ALIGNMENT) -> Launch:  # fmt: skip
    t, h = x.shape[0], x.shape[1] // 2
    cast = sf_layout is not None
    views = {"x": words(x.shape, x.dtype), "g": words(act_x_grad.shape, act_x_grad.dtype), "dx": words((t, 2 * h), OUT_DTYPES[fmt])}
    if cast:
        views["dq"] = words((t, 2 * h), jnp.float8_e4m3fn)
    if cast and sf_layout == "col_ue8m0":  # the kernel writes the packed UE8M0 words byte by byte
        (kw, tp), _ = F.sf_storage_shape(sf_layout, (t, 2 * h // num_per_channels))
        views["dsf"] = View((kw, tp, 4), dtype=np.uint8)
    if do_recompute:
        views["act"] = words((t, h), OUT_DTYPES[fmt])
    return Launch(
        kernel=swiglu_backward_kernel,
        params=dict(
            hidden=h, x_kind=KINDS[np.dtype(x.dtype)], g_kind=KINDS[np.dtype(act_x_grad.dtype)], grad_kind=fmt,
            npc=num_per_channels if (x_sf is not None or cast) else 0, x_layout=x_sf_layout if x_sf is not None else None, cast=cast,
            layout=sf_layout, round_sf=bool(round_sf), psum=psum is not None, alignment=int(token_alignment),
            weights=topk_weights is not None, rsf=routed_scaling_factor is not None, clamp=clamp_value is not None,
            recompute=bool(do_recompute), act_kind=fmt,
        ),  # fmt: skip
        scalars=dict(clamp_value=scalar(clamp_value), scaling=scalar(routed_scaling_factor), num_ctas=persistent_ctas(_grid_rows(t, sf_layout))),
        buffers={
            "xsf": "x_sf", "ps": "psum", "tw": "topk_weights", "g": "act_x_grad", "dx": "x_grad",
            "dq": "x_grad_data" if cast else None, "dsf": "x_grad_sf" if cast else None,
            "wg": "weight_grad" if topk_weights is not None else None, "act": "act_out" if do_recompute else None,
        },  # fmt: skip
        views=views,
    )


backward_op = TileOp(
    name="swiglu_backward", launch=_backward_launch, operands=("x", "act_x_grad", "x_sf?", "psum?", "topk_weights?"),
    results=_backward_results, reference=backward_reference, check=_backward_check, rows=_backward_rows,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Forward: the named cases (every kernel configuration the GPU tests and the benchmarks run) and
# the public function.


def _forward_case(name, t, h, fmt="bf16", dtype=jnp.bfloat16, psum=False, weights=False, experts=5, token_alignment=16, **options) -> PositionalSpec:
    routed = (psum_struct(experts) if psum else None, weights_struct(t) if weights else None)
    return case(name, (rows_struct(t, h, dtype), fmt, *routed), token_alignment=token_alignment, **options)


FORWARD_SPECS = (
    _forward_case("bf16", 1, 1024),
    _forward_case("routed_bf16", 200, 2048, psum=True, weights=True, routed_scaling_factor=2.5, clamp_value=0.5, with_clamped_count=True),
    _forward_case("weighted_fp32", 65, 7168, "fp32", weights=True, clamp_value=10.0, with_clamped_count=True),
    _forward_case("fp32_in_psum", 130, 1280, "bf16", jnp.float32, psum=True, routed_scaling_factor=1.5, with_clamped_count=True),
    _forward_case("fp32", 88, 576, "fp32", jnp.float32, clamp_value=0.5),
    _forward_case("empty", 0, 1024, with_clamped_count=True),
    _forward_case("bench_fwd_bf16", 32768, 2048, token_alignment=TOKEN_ALIGNMENT, bench=True),
)


@uses(forward_op, cases=FORWARD_SPECS)
def swiglu_forward(
    x: jax.Array,
    fmt: str = "bf16",
    psum_num_tokens_per_expert: Optional[jax.Array] = None,
    topk_weights: Optional[jax.Array] = None,
    routed_scaling_factor: Optional[float] = None,
    clamp_value: Optional[float] = None,
    with_clamped_count: bool = False,
    token_alignment: int = TOKEN_ALIGNMENT,
    *,
    impl=None,
    ops,
):
    """SwiGLU forward (TileKernels v2.1 ``swiglu_forward``): ``silu(l) · r · w``.

    Args:
      x: ``[T, 2H]`` bf16 or fp32, H a multiple of 64.
      fmt: output dtype, ``"bf16"`` or ``"fp32"``.
      psum_num_tokens_per_expert: int32 ``[E]``, nondecreasing inclusive ends of the experts' row
        segments (the psum layout; see :mod:`jax_tilek.swiglu`). Padding rows give zeros.
      topk_weights: float32 ``[T]``, one weight per row. routed_scaling_factor: a float factor.
      clamp_value: a positive float: ``l = min(l, c)``, ``r = clamp(r, -c, c)`` before the product.
      with_clamped_count: also return int32 ``[4]``: #(l > c), #(r > c), #(r < -c) over valid rows,
        and the number of valid activations (valid rows × H). (TileKernels accumulates int64 into a
        caller's buffer; here a fresh int32 array is returned: JAX disables int64 by default.)
      token_alignment: alignment of the experts' first rows (TileKernels' global, default 128).
      impl: None, ``"tilelang"`` or ``"xla"``.

    Returns:
      ``[T, H]`` in ``fmt`` (or ``(out, clamped_count)``), bit-exact with the reference.
    """
    name = "swiglu_forward"
    check_impl(impl, name)
    check_fmt(name, fmt)
    x, psum, weights = arrays(name, x, psum_num_tokens_per_expert, topk_weights)
    count = checks.static_bool(name, "with_clamped_count", with_clamped_count)
    routed = routing(name, routed_scaling_factor, clamp_value, token_alignment)
    return ops[0](x, psum, weights, impl=impl, fmt=fmt, with_clamped_count=count, **routed)


def _backward_case(name, t, h, dtype, g_dtype, fmt, psum=False, weights=False, experts=5, token_alignment=16, **options) -> PositionalSpec:
    routed = (psum_struct(experts) if psum else None, weights_struct(t) if weights else None)
    template = (rows_struct(t, h, dtype), jax.ShapeDtypeStruct((t, h), g_dtype), fmt, *routed)
    return case(name, template, token_alignment=token_alignment, tolerance=WEIGHT_GRAD_TOLERANCE if weights else None, **options)


_BF16, _F32 = jnp.bfloat16, jnp.float32
BACKWARD_SPECS = (
    _backward_case("bf16", 1, 1024, _BF16, _BF16, "bf16"),
    _backward_case("routed_bf16", 150, 2048, _BF16, _BF16, "bf16", psum=True, weights=True, routed_scaling_factor=2.5, clamp_value=0.5, do_recompute=True),
    _backward_case("weighted_fp32", 33, 7168, _F32, _BF16, "fp32", weights=True, clamp_value=10.0),
    _backward_case("fp32_grad_psum", 90, 1280, _BF16, _F32, "fp32", psum=True, routed_scaling_factor=1.5, do_recompute=True),
    # fp32 x and gradient: TileKernels' operation order where 1 + l·(1 - s) cancels, both output dtypes
    _backward_case("order_fp32", 104, 1024, _F32, _F32, "fp32", weights=True, routed_scaling_factor=2.5),
    _backward_case("order_bf16", 104, 1024, _F32, _F32, "bf16", weights=True, routed_scaling_factor=2.5),
    _backward_case("bench_bwd_bf16_routed", 32768, 2048, _BF16, _BF16, "bf16", psum=True, weights=True, experts=8, routed_scaling_factor=2.5,
                   clamp_value=10.0, token_alignment=TOKEN_ALIGNMENT, bench=True),  # fmt: skip
)


@uses(backward_op, cases=BACKWARD_SPECS)
def swiglu_backward(
    x: jax.Array,
    act_x_grad: jax.Array,
    fmt: str = "bf16",
    psum_num_tokens_per_expert: Optional[jax.Array] = None,
    topk_weights: Optional[jax.Array] = None,
    routed_scaling_factor: Optional[float] = None,
    clamp_value: Optional[float] = None,
    token_alignment: int = TOKEN_ALIGNMENT,
    do_recompute: bool = False,
    *,
    impl=None,
    ops,
):
    """SwiGLU backward (TileKernels v2.1 ``swiglu_backward``).

    With ``s = 1 / (1 + exp(-l'))`` of the clamped ``l'``, ``r'`` and ``w = topk_weights ·
    routed_scaling_factor``, in TileKernels' operation order: ``gs = (g·w)·s``, ``dl = (gs·r')·fma(l',
    1 - s, 1)`` (one rounding; 0 where ``l > c``), ``dr = gs·l'`` (0 where ``|r| > c``), ``weight_grad
    = rsf · Σ_h g · silu(l')·r'``.

    Args:
      x: ``[T, 2H]`` bf16 or fp32 (the forward's input). act_x_grad: ``[T, H]`` bf16 or fp32.
      fmt: dtype of the gradient (and of the recomputed activation), ``"bf16"`` or ``"fp32"``.
      psum_num_tokens_per_expert, topk_weights, routed_scaling_factor, clamp_value,
        token_alignment: as in :func:`swiglu_forward`.
      do_recompute: also return the forward's output (weighted activation).

    Returns:
      ``x_grad [T, 2H]``, or a tuple ``(x_grad, weight_grad fp32 [T] if topk_weights, act_out
      [T, H] if do_recompute)``. Zeros on padding rows. All but ``weight_grad`` are bit-exact with
      the reference; ``weight_grad`` sums in another order (relative differences ~1e-6).
    """
    name = "swiglu_backward"
    check_impl(impl, name)
    check_fmt(name, fmt)
    x, psum, weights = arrays(name, x, psum_num_tokens_per_expert, topk_weights)
    g = checks.as_array(name, "act_x_grad", act_x_grad)
    recompute = checks.static_bool(name, "do_recompute", do_recompute)
    routed = routing(name, routed_scaling_factor, clamp_value, token_alignment)
    out = ops[0](x, g, None, psum, weights, impl=impl, fmt=fmt, do_recompute=recompute, with_weight_grad=weights is not None, **routed)
    return out[0] if len(out) == 1 else out


# ---------------------------------------------------------------------------------------------
# One differentiable SwiGLU: the forward op, and the backward op as its VJP.


def _swiglu_primal(x, topk_weights, psum, *, ops, impl=None, fmt=None, **routed):
    return ops[0](x, psum, topk_weights, impl=impl, fmt=fmt or KINDS[np.dtype(x.dtype)], **routed)


def _swiglu_fwd(x, topk_weights, psum, *, ops, impl=None, fmt=None, **routed):
    return _swiglu_primal(x, topk_weights, psum, ops=ops, impl=impl, fmt=fmt, **routed), (x, topk_weights, psum)


def _swiglu_bwd(residuals, g, *, ops, impl=None, fmt=None, **routed):
    x, topk_weights, psum = residuals
    weighted = topk_weights is not None
    out = ops[1](x, g, None, psum, topk_weights, impl=impl, fmt=KINDS[np.dtype(x.dtype)], with_weight_grad=weighted, **routed)
    return out[0], out[1] if weighted else None, None


_swiglu = with_vjp(_swiglu_primal, _swiglu_fwd, _swiglu_bwd)

SWIGLU_SPECS = (
    case("routed_bf16", (rows_struct(120, 2048), weights_struct(120), psum_struct()), routed_scaling_factor=2.5, clamp_value=10.0, token_alignment=16),
    case("weighted_fp32", (rows_struct(64, 256, jnp.float32), weights_struct(64)), routed_scaling_factor=1.25, clamp_value=0.5, token_alignment=16),
)


@uses(forward_op, backward_op, cases=SWIGLU_SPECS, differentiable=True)
def swiglu(
    x: jax.Array,
    topk_weights: Optional[jax.Array] = None,
    psum_num_tokens_per_expert: Optional[jax.Array] = None,
    *,
    routed_scaling_factor: Optional[float] = None,
    clamp_value: Optional[float] = None,
    token_alignment: int = TOKEN_ALIGNMENT,
    fmt: Optional[str] = None,
    impl=None,
    ops,
) -> jax.Array:
    """Differentiable SwiGLU: :func:`swiglu_forward` forward, :func:`swiglu_backward` backward.

    Gradients flow to ``x`` and ``topk_weights`` (not to the psum layout). ``fmt`` is the output
    dtype (default: x's). With ``impl="xla"`` JAX differentiates the reference instead; there the
    clamp's gradient at ``l == c`` is JAX's (half) rather than the kernel's (full).
    """
    name = "swiglu"
    check_impl(impl, name)
    x, psum, weights = arrays(name, x, psum_num_tokens_per_expert, topk_weights)
    routed = routing(name, routed_scaling_factor, clamp_value, token_alignment)
    check_rows(name, x, psum, weights, token_alignment=routed["token_alignment"])
    if fmt is not None:
        check_fmt(name, fmt)
    return _swiglu(x, weights, psum, impl=impl, fmt=fmt, ops=ops, **routed)


