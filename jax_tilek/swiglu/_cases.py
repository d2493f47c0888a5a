"""The SwiGLU functions' named cases (``ARG_SPECS``, declared next to each op): their arguments as
``jax.ShapeDtypeStruct``, valid values for them (TileKernels' test inputs), and
:func:`case`, a :class:`jax_tilek.testing.PositionalSpec` (TileKernels' signatures take static
options positionally between the arrays)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.quant import formats as F
from jax_tilek.testing import PositionalSpec

# The backward's weight gradient sums in another order than the reference: a case with topk weights
# compares its results within this (the GPU tests also check the rest bit for bit).
WEIGHT_GRAD_TOLERANCE = 1e-2


def rows_struct(t: int, h: int, dtype=jnp.bfloat16) -> jax.ShapeDtypeStruct:
    """``x[T, 2H]``."""
    return jax.ShapeDtypeStruct((t, 2 * h), dtype)


def psum_struct(experts: int = 5) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((experts,), jnp.int32)


def weights_struct(t: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((t,), jnp.float32)


def psum_layout(rng: np.random.Generator, t: int, experts: int, alignment: int) -> np.ndarray:
    """int32 ``[E]``: random segment lengths (one expert empty), starts aligned, ending <= t."""
    counts = rng.integers(0, max(t // experts, 1) + 1, experts)
    counts[rng.integers(experts)] = 0
    ends, prev = [], 0
    for n in counts:
        start = -(-prev // alignment) * alignment
        prev = max(min(start + int(n), t), prev)
        ends.append(prev)
    return np.array(ends, np.int32)


def inputs(token_alignment: int = 16, clamp_value: Optional[float] = None, x_scales: Optional[tuple[int, str]] = None) -> Callable[..., tuple]:
    """``make`` for the cases (TileKernels' test inputs): x normal times 2, 2% of it times 8 more (past
    the clamps), values equal to ±clamp_value moved to 0 (there the kernels' gradient is one-sided,
    JAX's half); the output gradient normal times 0.5; a psum layout of its E experts; topk weights in
    [0.05, 1). With ``x_scales = (npc, layout)`` x comes as e4m3 data and scales: fp32 values cast per
    token (power-of-two scales for "col_ue8m0")."""

    def x_values(rng, shape, dtype):
        x = rng.standard_normal(shape, dtype=np.float32) * 2
        x[rng.random(shape) < 0.02] *= 8
        x = x.astype(dtype)
        if clamp_value is not None:
            x[np.abs(x.astype(np.float32)) == np.float32(clamp_value)] = 0
        return x

    def make(rng: np.random.Generator, x, *rest) -> tuple:
        t = x.shape[0]
        if x_scales is None:
            out = [x_values(rng, x.shape, x.dtype)]
        else:
            (npc, layout), rest = x_scales, rest[1:]
            q, sf = F.quantize_blocks(x_values(rng, x.shape, np.float32), "e4m3", (1, npc), round_sf=layout == "col_ue8m0")
            out = [np.asarray(q), np.asarray(F.store_sf(sf, layout))]
        for a in rest:
            if a.dtype == jnp.int32:
                out.append(psum_layout(rng, t, a.shape[0], token_alignment))
            elif a.ndim == 1:
                out.append(rng.uniform(0.05, 1.0, t).astype(np.float32))
            else:  # the output gradient
                out.append((rng.standard_normal(a.shape, dtype=np.float32) * 0.5).astype(a.dtype))
        return tuple(out)

    return make


def case(name: str, template: tuple, *, bench: bool = False, x_scales=None, tolerance: Optional[float] = None, **options) -> PositionalSpec:
    """The call ``fn(*template, **options)`` named ``name_TxW`` (x's shape), with :func:`inputs` for its values."""
    make = inputs(options.get("token_alignment", 16), options.get("clamp_value") or options.get("swiglu_clamp_value"), x_scales)
    arrays = tuple(a for a in jax.tree.leaves(template) if isinstance(a, jax.ShapeDtypeStruct))
    t, w = arrays[0].shape
    return PositionalSpec(f"{name}_{t}x{w}", arrays, options, make=make, tolerance=tolerance, bench=bench, template=template)
