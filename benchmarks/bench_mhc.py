"""mHC benchmarks (family "mhc"): every mHC function at its named benchmark sizes (DeepSeek: hidden
4096 / 7168, n = 4 streams, 4K-64K tokens) against the same function's pure-JAX definition
(``impl="xla"``) under jit. Inputs are random normals made on the device; the GEMM-containing
functions (norm_fn, pre, head, big_fuse) time the XLA split-K GEMM on both sides.

``VARIANTS`` (family "mhc_variants"): ``mhc_pre_norm_fn`` and ``mhc_pre`` with that GEMM as the S-split
fp32 einsum at ``HIGHEST`` precision or in XLA's ``BF16_BF16_F32_X6`` / ``X3`` algorithms instead of
the default one-pass bf16 dot (``_norm_fn.GEMM_PRECISION``), on both sides; and the backward's
``mhc_pre_residual_bwd`` kernel in each of ``RESIDUAL_BWD_TILINGS`` (all give the same bits)."""

import dataclasses
import functools

import jax
import numpy as np

from jax_tilek import mhc
from jax_tilek.mhc import _norm_fn, _residual_grad
from jax_tilek.testing import ArgSpec, over_arrays

from benchmarks.harness import Case, random_inputs

FAMILY = "mhc"


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _case(name: str, fn, spec: ArgSpec) -> Case:
    run, structs = over_arrays(spec.call(fn, "xla"), spec.args)
    out = jax.eval_shape(run, *structs)
    params = {"shape": "x".join(map(str, structs[0].shape)), "dtype": np.dtype(structs[0].dtype).name}
    case = Case.of_spec(FAMILY, fn, spec, None, _nbytes(structs) + _nbytes(out), params)
    return dataclasses.replace(case, name=f"{name}/{spec.name}")


def _functions() -> dict:
    """Each public function once (``expand_from_embedding`` shares ``expand_to_mhc``'s cases)."""
    return {name: getattr(mhc, name) for name in mhc.__all__ if name != "expand_from_embedding"}


CASES = [_case(name, fn, spec) for name, fn in _functions().items() for spec in getattr(fn, "cases", ()) if spec.bench]


GEMM_ALGORITHMS = {
    "highest": "highest", "x6": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6, "x3": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
}  # fmt: skip


def with_gemm_precision(fn, precision):
    """``fn`` traced with the mHC partials GEMM at ``precision`` (the module constant is read at trace time)."""

    @functools.wraps(fn)
    def traced(*args):
        saved, _norm_fn.GEMM_PRECISION = _norm_fn.GEMM_PRECISION, precision
        try:
            return fn(*args)
        finally:
            _norm_fn.GEMM_PRECISION = saved

    return traced


def gemm_variants(cases) -> list:
    """Each case once per :data:`GEMM_ALGORITHMS` entry, kernel and plain-JAX sides alike."""
    return [dataclasses.replace(c, name=f"{c.name}_gemm_{label}", kernel=with_gemm_precision(c.kernel, p), xla=with_gemm_precision(c.xla, p))
            for label, p in GEMM_ALGORITHMS.items() for c in cases]  # fmt: skip


# mhc_pre_residual_bwd's tilings (_residual_grad.ResidualGradConfig): tokens a thread, tokens a CTA, CTAs an SM.
RESIDUAL_BWD_TILINGS = ((8, 128, 1), (4, 128, 6), (4, 128, 5), (2, 128, 6), (4, 64, 7))


def residual_bwd_variants(shapes=((4096, 7168), (16384, 4096)), n: int = 4) -> list:
    """The backward's residual kernel alone (with mhc_post's cotangent added, as HyperConnection runs
    it) in each of :data:`RESIDUAL_BWD_TILINGS`, against the op's reference (``impl="xla"``)."""
    m = n * (n + 2)
    cases = []
    for t, h in shapes:
        structs = ((t, h, "bfloat16"), (t, n, h, "bfloat16"), (t, n, 1, "float32"), (t, m, "float32"), (t, "float32"),
                   (m, n * h, "float32"), (t, n, h, "bfloat16"))  # fmt: skip
        structs = tuple(jax.ShapeDtypeStruct(s[:-1], s[-1]) for s in structs)
        out = 2 * t * n * h
        for step, tokens, ctas in RESIDUAL_BWD_TILINGS:
            op = _residual_grad.residual_grad_op.with_config(tokens_per_thread=step, tokens_per_cta=tokens, ctas_per_sm=ctas)
            name = f"mhc_pre_residual_bwd/t{t}_h{h}_thread{step}_cta{tokens}_sm{ctas}"
            params = {"shape": f"{t}x{n}x{h}", "dtype": "bfloat16"}
            cases.append(Case.of_impls(FAMILY, name, random_inputs(structs), lambda impl, op=op: functools.partial(op, impl=impl), _nbytes(structs) + out, params))
    return cases


VARIANTS = gemm_variants([c for c in CASES if c.name.startswith(("mhc_pre_norm_fn/", "mhc_pre/"))]) + residual_bwd_variants()
