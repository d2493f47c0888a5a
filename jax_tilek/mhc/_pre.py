"""The composite mHC functions: ``mhc_pre``, ``mhc_head``, ``mhc_pre_big_fuse`` and
``mhc_multilayer_recompute`` (TileKernels v1 §5.8-5.10, ``modeling/mhc/functional.py``).

``mhc_pre`` = norm_fn -> split_mixes -> sinkhorn(comb) -> apply_mix(residual, pre), each step its
own kernel forward; the backward is one custom VJP over the chain that writes the residual's
cotangent once (:mod:`jax_tilek.mhc._residual_grad`); JAX adds mhc_post's cotangent of the
residual to it functionally. ``mhc_head`` likewise, with the head mix.

``mhc_pre_big_fuse`` (inference) returns ``(post_mix, comb_mix, layer_input)``. **It is not a fused
kernel here**: it runs the same kernels as ``mhc_pre`` in the same order, so its results are
bit-identical to the step-by-step path on every backend. Unlike TileKernels (whose big-fuse has no
norm-weight input, so ``mhc_pre`` without gradients silently drops ``norm_weight``), it takes and
applies ``norm_weight``.

``mhc_multilayer_recompute`` re-derives the residual stream through L layers functionally: for each
layer i, ``layer_input[i] = apply_mix(res, pre_mix[i])`` and, for i < L_post,
``res = mhc_post(layer_output[i], res, post_mix[i], comb_mix[i])`` (re-rounded to bf16 between layers,
exactly as if materialised). L_post = len(post_mix_list) is L or L - 1. It returns
``(layer_input_list, residual_list)`` instead of writing into caller lists; it launches the
apply-mix and post kernels per layer (no single fused kernel), and is therefore bit-identical to the
loop of those ops.

``mhc_head`` pads nothing: the norm_fn kernels take any M <= 96, so fn ``[n, nH]`` is used as it is
(TileKernels pads it with zero rows to n(n+2) to reuse its kernel; the first n mixes are the same).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks
from jax_tilek.mhc import _apply_mix, _norm_fn, _post, _products, _residual_grad, _sinkhorn, _split_mixes
from jax_tilek.mhc._common import BF16, F32, check_dtype, check_eps, check_shape, n3
from jax_tilek.op import uses
from jax_tilek.testing import ArgSpec, random_array

_PRE_OPS = (
    _products.products_op, _norm_fn._reduce_fwd_op, _norm_fn._reduce_bwd_op, _norm_fn._merge_fwd_op, _norm_fn._merge_bwd_op,
    _split_mixes._split_fwd_op, _split_mixes._split_bwd_op, _sinkhorn._fwd_op, _sinkhorn._bwd_op,
    _apply_mix._fwd_op, _apply_mix.dmix_op, _residual_grad.residual_grad_op,
)  # fmt: skip


def _check_pre(op, residual, fn, scale, base, norm_weight, norm_eps, mhc_mult, post_mult_value, pre_eps, sinkhorn_eps, sinkhorn_repeat, n_splits):
    from jax_tilek.mhc._common import check_mult

    n = check_mult(op, mhc_mult)
    residual, fn, w, n, h, eps, s = _norm_fn.check_norm_fn(op, residual, fn, norm_weight, norm_eps, n_splits, mhc_mult=n, rows=n3(n))
    scale, base = checks.as_array(op, "scale", scale), checks.as_array(op, "base", base)
    check_dtype(op, "scale", scale, F32)
    check_dtype(op, "base", base, F32)
    check_shape(op, "scale", scale, (3,))
    check_shape(op, "base", base, (n3(n),))
    pm = checks.static_number(op, "post_mult_value", post_mult_value, positive=True, optional=False)
    pre_eps = check_eps(op, "pre_eps", pre_eps)
    repeat, sk_eps = _sinkhorn.check_sinkhorn(op, sinkhorn_repeat, sinkhorn_eps)
    return residual, fn, scale, base, w, n, h, dict(eps=eps, n_splits=s, post_mult_value=pm, pre_eps=pre_eps, repeat=repeat, sinkhorn_eps=sk_eps)


def _pre_flat(x, fn, scale, base, w, *, impl, n: int, eps, n_splits, post_mult_value, pre_eps, repeat, sinkhorn_eps, alias=False, residual_op=None):
    """The pre chain on flat tokens: ``(layer_input [T, H], post [T, n, 1], comb [T, n, n])`` and, with
    ``alias``, x (:mod:`jax_tilek.mhc._residual_grad`: the step-by-step kernels forward, a fused backward)."""
    layer_input, (post, comb), *x_alias = _residual_grad.norm_mix_apply_flat(
        x, fn, scale, base, w, impl=impl, kind="pre", eps=eps, n_splits=n_splits, post_mult_value=post_mult_value,
        pre_eps=pre_eps, repeat=repeat, sinkhorn_eps=sinkhorn_eps, alias=alias, residual_op=residual_op,
    )  # fmt: skip
    return layer_input, post, comb, *x_alias


def _pre_args(lead, h, n=4, weight=False):
    return (
        jax.ShapeDtypeStruct((*lead, n, h), BF16), jax.ShapeDtypeStruct((n3(n), n * h), F32),
        jax.ShapeDtypeStruct((3,), F32), jax.ShapeDtypeStruct((n3(n),), F32),
    ), (jax.ShapeDtypeStruct((n * h,), F32) if weight else None)  # fmt: skip


def _pre_make(structs, w_struct, keyword: bool):
    def make(rng, *_):
        res = random_array(rng, structs[0].shape, BF16)
        fn = (rng.standard_normal(structs[1].shape) * 1e-2).astype(np.float32)
        scale = (rng.standard_normal(3) * 0.5).astype(np.float32)
        base = (rng.standard_normal(structs[3].shape) * 0.5).astype(np.float32)
        out = [res, fn, scale, base]
        if not keyword:
            out.append(None if w_struct is None else (1 + 0.1 * rng.standard_normal(w_struct.shape)).astype(np.float32))
        return tuple(out)

    return make


def _pre_case(lead, h, n=4, weight=False, launches=None, **options) -> ArgSpec:
    structs, w = _pre_args(lead, h, n, weight)
    kwargs = dict(mhc_mult=n, post_mult_value=2.0, pre_eps=1e-2)
    name = f"{'x'.join(map(str, lead))}x{h}_n{n}" + ("_w" if weight else "")
    count = launches if launches is not None else (5 if weight else 4) + _products.takes(n * h, n3(n))
    return ArgSpec(name, structs + (w,), kwargs, make=_pre_make(structs, w, False), tolerance=1e-2, launches=count, **options)


PRE_SPECS = (
    _pre_case((2, 4), 128),
    _pre_case((6,), 64, weight=True),
    _pre_case((3,), 32, n=2),
    _pre_case((5, 7), 64, config=dict(tokens_per_thread=8, tokens_per_cta=32, ctas_per_sm=2)),  # the backward's tiling
    _pre_case((4096,), 7168, bench=True),
    _pre_case((16384,), 4096, weight=True, bench=True),
)


@uses(*_PRE_OPS, cases=PRE_SPECS, differentiable=True)
def mhc_pre(
    residual: jax.Array, fn: jax.Array, scale: jax.Array, base: jax.Array, norm_weight: jax.Array | None = None, *,
    norm_eps: float = 1e-6, mhc_mult: int = 4, post_mult_value: float = 1.0, pre_eps: float = 1e-6,
    sinkhorn_eps: float = 1e-6, sinkhorn_repeat: int = 10, n_splits: int = 16, return_residual: bool = False, impl=None, ops,
) -> tuple:  # fmt: skip
    """mHC pre-processing of one sub-layer.

    Args: ``residual [..., n, H]`` bf16, ``fn [n(n+2), nH]``, ``scale [3]``, ``base [n(n+2)]``,
    ``norm_weight [nH]`` or None (fp32).
    Returns ``(layer_input [..., H] bf16, (post_mix [..., n, 1], comb_mix [..., n, n]))``; the pair is
    what :func:`mhc_post` takes. Differentiable in every array (module docstring).
    ``return_residual=True`` appends ``residual`` itself: pass that to :func:`mhc_post` (and use it
    nowhere else) and mhc_post's cotangent of the residual is added inside this backward's kernel,
    not by XLA afterwards (same values, ~1.5 residual-sized passes less).
    """
    residual, fn, scale, base, w, n, h, opts = _check_pre(
        "mhc_pre", residual, fn, scale, base, norm_weight, norm_eps, mhc_mult, post_mult_value, pre_eps, sinkhorn_eps, sinkhorn_repeat, n_splits
    )
    return_residual = checks.static_bool("mhc_pre", "return_residual", return_residual)
    lead = residual.shape[:-2]
    li, post, comb, *alias = _pre_flat(
        residual.reshape(-1, n, h), fn, scale, base, w, impl=impl, n=n, alias=return_residual, residual_op=_residual_grad.configured(ops), **opts
    )
    out = li.reshape(*lead, h), (post.reshape(*lead, n, 1), comb.reshape(*lead, n, n))
    return (*out, alias[0].reshape(residual.shape)) if return_residual else out


def _fuse_case(lead, h, n=4, weight=False, **options) -> ArgSpec:
    structs, w = _pre_args(lead, h, n, weight)
    kwargs = dict(rms_eps=1e-6, mhc_pre_eps=1e-2, mhc_sinkhorn_eps=1e-6, mhc_post_mult_value=2.0, sinkhorn_repeat=10)
    name = f"{'x'.join(map(str, lead))}x{h}_n{n}" + ("_w" if weight else "")
    return ArgSpec(name, structs + (w,), kwargs, make=_pre_make(structs, w, False), tolerance=1e-2, launches=(5 if weight else 4) + _products.takes(n * h, n3(n)), **options)


FUSE_SPECS = (
    _fuse_case((2, 4), 128),
    _fuse_case((6,), 64, weight=True),
    _fuse_case((4096,), 7168, bench=True),
    _fuse_case((16384,), 4096, weight=True, bench=True),
)


@uses(*_PRE_OPS, cases=FUSE_SPECS)
def mhc_pre_big_fuse(
    residual: jax.Array, fn: jax.Array, mhc_scale: jax.Array, mhc_base: jax.Array, norm_weight: jax.Array | None = None, *,
    rms_eps: float = 1e-6, mhc_pre_eps: float = 1e-6, mhc_sinkhorn_eps: float = 1e-6, mhc_post_mult_value: float = 1.0,
    sinkhorn_repeat: int = 10, n_splits: int = 16, impl=None, ops,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """Inference form of :func:`mhc_pre`: ``(post_mix [..., n, 1], comb_mix [..., n, n], layer_input [..., H])``,
    bit-identical to the step-by-step path, ``norm_weight`` honoured (module docstring). n is
    ``residual.shape[-2]``."""
    residual, fn, scale, base, w, n, h, opts = _check_pre(
        "mhc_pre_big_fuse", residual, fn, mhc_scale, mhc_base, norm_weight, rms_eps, _mult_of(residual), mhc_post_mult_value,
        mhc_pre_eps, mhc_sinkhorn_eps, sinkhorn_repeat, n_splits,
    )  # fmt: skip
    lead = residual.shape[:-2]
    li, post, comb = _pre_flat(residual.reshape(-1, n, h), fn, scale, base, w, impl=impl, n=n, residual_op=_residual_grad.configured(ops), **opts)
    return post.reshape(*lead, n, 1), comb.reshape(*lead, n, n), li.reshape(*lead, h)


def _mult_of(residual) -> int:
    shape = getattr(residual, "shape", ())
    return shape[-2] if len(shape) >= 2 else 0


def _head_case(lead, h, n=4, weight=False, **options) -> ArgSpec:
    args = (
        jax.ShapeDtypeStruct((*lead, n, h), BF16), jax.ShapeDtypeStruct((n, n * h), F32),
        jax.ShapeDtypeStruct((1,), F32), jax.ShapeDtypeStruct((n,), F32),
        jax.ShapeDtypeStruct((n * h,), F32) if weight else None,
    )  # fmt: skip

    def make(rng, *_):
        return (
            random_array(rng, args[0].shape, BF16), (rng.standard_normal(args[1].shape) * 1e-2).astype(np.float32),
            (rng.standard_normal(1) * 0.5).astype(np.float32), (rng.standard_normal(n) * 0.5).astype(np.float32),
            None if not weight else (1 + 0.1 * rng.standard_normal(n * h)).astype(np.float32),
        )  # fmt: skip

    name = f"{'x'.join(map(str, lead))}x{h}_n{n}" + ("_w" if weight else "")
    return ArgSpec(name, args, dict(mhc_mult=n, pre_eps=1e-2), make=make, tolerance=1e-2, launches=(4 if weight else 3) + _products.takes(n * h, n), **options)


HEAD_SPECS = (
    _head_case((2, 4), 128),
    _head_case((6,), 64, weight=True),
    # the backward's tiling, where tokens_per_cta x n rows (32 x 2) is less than a CTA's threads:
    _head_case((3, 11), 64, n=2, config=dict(tokens_per_thread=8, tokens_per_cta=32, ctas_per_sm=2)),
    _head_case((4096,), 7168, bench=True),
)


@uses(*_PRE_OPS[:5], _split_mixes._head_fwd_op, _split_mixes._head_bwd_op, *_PRE_OPS[-3:], cases=HEAD_SPECS, differentiable=True)
def mhc_head(
    residual: jax.Array, fn: jax.Array, scale: jax.Array, base: jax.Array, norm_weight: jax.Array | None = None, *,
    norm_eps: float = 1e-6, mhc_mult: int = 4, pre_eps: float = 1e-6, n_splits: int = 16, impl=None, ops,
) -> jax.Array:  # fmt: skip
    """mHC head: ``residual [..., n, H]`` bf16 -> ``[..., H]`` bf16 for the LM head, with ``fn [n, nH]``,
    ``scale [1]`` (or a scalar), ``base [n]``, ``norm_weight [nH]`` or None: norm_fn -> head_compute_mix
    -> apply_mix. Differentiable in every array."""
    from jax_tilek.mhc._common import check_mult

    name = "mhc_head"
    n = check_mult(name, mhc_mult)
    residual, fn, w, n, h, eps, s = _norm_fn.check_norm_fn(name, residual, fn, norm_weight, norm_eps, n_splits, mhc_mult=n, rows=n)
    scale, base = checks.as_array(name, "scale", scale), checks.as_array(name, "base", base)
    check_dtype(name, "scale", scale, F32)
    check_dtype(name, "base", base, F32)
    if scale.size != 1:
        raise ValueError(f"{name}: scale must hold one value ([1] or a scalar), got shape {scale.shape}")
    check_shape(name, "base", base, (n,))
    pre_eps = check_eps(name, "pre_eps", pre_eps)
    lead = residual.shape[:-2]
    out, _ = _residual_grad.norm_mix_apply_flat(
        residual.reshape(-1, n, h), fn, scale.reshape(1), base, w, impl=impl, kind="head", eps=eps, n_splits=s,
        post_mult_value=None, pre_eps=pre_eps, repeat=None, sinkhorn_eps=None, alias=False, residual_op=_residual_grad.configured(ops),
    )  # fmt: skip
    return out.reshape(*lead, h)


# ---------------------------------------------------------------------------------------------
# Recompute.


def _recompute_case(layers, post_layers, lead, h, n=4, **options) -> ArgSpec:
    res = jax.ShapeDtypeStruct((*lead, n, h), BF16)
    pre = [jax.ShapeDtypeStruct((*lead, n, 1), F32) for _ in range(layers)]
    outs = [jax.ShapeDtypeStruct((*lead, h), BF16) for _ in range(post_layers)]
    post = [jax.ShapeDtypeStruct((*lead, n, 1), F32) for _ in range(post_layers)]
    comb = [jax.ShapeDtypeStruct((*lead, n, n), F32) for _ in range(post_layers)]

    def make(rng, *_):
        from jax_tilek.mhc._common import random_probs

        return (
            random_array(rng, res.shape, BF16), [random_probs(rng, p.shape) for p in pre],
            [random_array(rng, o.shape, BF16) for o in outs], [random_probs(rng, p.shape) * 2 for p in post],
            [random_probs(rng, c.shape) for c in comb],
        )  # fmt: skip

    name = f"L{layers}_{post_layers}_{'x'.join(map(str, lead))}x{h}"
    return ArgSpec(name, (res, pre, outs, post, comb), make=make, tolerance=1e-2, launches=layers + post_layers, **options)


RECOMPUTE_SPECS = (
    _recompute_case(1, 1, (8,), 256),
    _recompute_case(3, 2, (2, 4), 128),
    _recompute_case(3, 3, (5,), 64),
    _recompute_case(10, 9, (8192,), 7168, bench=True),
)


@uses(_apply_mix._fwd_op, _post._fwd_op, cases=RECOMPUTE_SPECS)
def mhc_multilayer_recompute(
    initial_residual: jax.Array, pre_mix_list: Sequence[jax.Array], layer_output_list: Sequence[jax.Array],
    post_mix_list: Sequence[jax.Array], comb_mix_list: Sequence[jax.Array], *, impl=None, ops,
) -> tuple[list[jax.Array], list[jax.Array]]:  # fmt: skip
    """Re-derives L layers' inputs and residuals (module docstring).

    Args: ``initial_residual [..., n, H]`` bf16; L ``pre_mix [..., n, 1]`` fp32; L_post (L or L - 1)
    ``layer_output [..., H]`` bf16, ``post_mix [..., n, 1]`` and ``comb_mix [..., n, n]`` fp32.
    Returns ``(layer_inputs: L x [..., H] bf16, residuals: L_post x [..., n, H] bf16)``.
    """
    name = "mhc_multilayer_recompute"
    from jax_tilek.mhc._common import check_residual

    res, n, h = check_residual(name, initial_residual, name="initial_residual")
    lead = res.shape[:-2]
    lists = [list(v) if isinstance(v, (list, tuple)) else None for v in (pre_mix_list, layer_output_list, post_mix_list, comb_mix_list)]
    if any(v is None for v in lists):
        raise TypeError(f"{name}: the mix and output arguments must be lists (or tuples) of arrays")
    pre, outs, post, comb = lists
    layers, post_layers = len(pre), len(post)
    if layers < 1 or post_layers not in (layers - 1, layers) or len(outs) != post_layers or len(comb) != post_layers:
        raise ValueError(
            f"{name}: needs L >= 1 pre mixes and L_post in {{L - 1, L}} layer outputs, post mixes and comb mixes; got "
            f"{layers}, {len(outs)}, {post_layers}, {len(comb)}"
        )
    inputs, residuals = [], []
    x = res.reshape(-1, n, h)
    for i in range(layers):
        mix = _apply_mix.check_mix(name, pre[i], lead, n, f"pre_mix_list[{i}]")
        inputs.append(_apply_mix.apply_mix_flat(x, mix.reshape(-1, n, 1), impl=impl).reshape(*lead, h))
        if i < post_layers:
            o, _, p, c, _, _ = _post.check_post(name, outs[i], res, post[i], comb[i])
            x = _post.post_flat(o.reshape(-1, h), x, p.reshape(-1, n, 1), c.reshape(-1, n, n), impl=impl)
            residuals.append(x.reshape(*lead, n, h))
    return inputs, residuals
