"""mHC benchmarks (family "mhc"): every mHC function at its named benchmark sizes (DeepSeek: hidden
4096 / 7168, n = 4 streams, 4K-64K tokens) against the same function's pure-JAX definition
(``impl="xla"``) under jit. Inputs are random normals made on the device; the GEMM-containing
functions (norm_fn, pre, head, big_fuse) time the XLA split-K GEMM on both sides.

``VARIANTS`` (family "mhc_variants"): ``mhc_pre_norm_fn`` and ``mhc_pre`` with that GEMM as the S-split
fp32 einsum at ``HIGHEST`` precision or in XLA's ``BF16_BF16_F32_X6`` / ``X3`` algorithms instead of
the default one-pass bf16 dot (``_norm_fn.GEMM_PRECISION``), on both sides."""

import dataclasses
import functools

import jax
import numpy as np

from jax_tilek import mhc
from jax_tilek.mhc import _norm_fn
from jax_tilek.testing import ArgSpec, over_arrays

from benchmarks.harness import Case

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


VARIANTS = gemm_variants([c for c in CASES if c.name.startswith(("mhc_pre_norm_fn/", "mhc_pre/"))])
