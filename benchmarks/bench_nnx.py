"""Layer benchmarks (family "nnx"): ``jax_tilek.nnx.MoE`` forward + backward (gradients of every
parameter and of the input) on the kernels against the same layer on the plain-JAX references
(``impl="xla"``: ``lax.top_k``, sorts, gathers, segment sums, ``lax.ragged_dot``) under jit; and an
mHC block (``jax_tilek.nnx.HyperConnection``, n = 4 streams, around an elementwise sub-layer so that
the mHC machinery is what is timed: norm + mixes + Sinkhorn, the pre mix, the post/comb update and
their backward) the same way, at DeepSeek's hidden sizes.

Each input set is fresh tokens and fresh float32 parameters (the layer as it trains: master weights
in float32, compute in bfloat16). ``min_bytes`` counts the parameters and tokens read and their
gradients written once, so the copy fraction is only a floor; the figure to read is the speed-up.
``flops`` records the expert and shared-expert matmuls' useful FLOPs (forward and backward: 3 × 2·M·N·K
over the routed rows): ``flops / time_us / 1e6`` is their TFLOP/s."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import bench_mhc
from benchmarks.harness import Case

FAMILY = "nnx"


@dataclasses.dataclass(frozen=True)
class MoEShape:
    name: str
    tokens: int
    dim: int
    ffn: int
    experts: int
    topk: int
    shared: int = 1

    def layer(self, impl: str, rngs: nnx.Rngs):
        from jax_tilek.nnx import MoE

        return MoE(self.dim, self.ffn, self.experts, self.topk, num_shared_experts=self.shared, impl=impl, rngs=rngs)

    @property
    def matmul_flops(self) -> int:
        rows = self.tokens * (self.topk + self.shared)
        return 3 * 2 * rows * self.dim * 3 * self.ffn  # up (2·ffn wide) + down (ffn), forward + two backward GEMMs


SHAPES = (
    MoEShape("main_job_small", tokens=16384, dim=512, ffn=256, experts=32, topk=4),
    MoEShape("t8192_d2048_e64_k6", tokens=8192, dim=2048, ffn=1024, experts=64, topk=6),
    MoEShape("t16384_d4096_e64_k8", tokens=16384, dim=4096, ffn=1024, experts=64, topk=8),
)


def _forward_backward(shape: MoEShape, impl: str):
    graphdef = functools.cache(lambda: nnx.split(nnx.eval_shape(lambda: shape.layer(impl, nnx.Rngs(0))))[0])

    def step(x, state):
        def objective(state, x):
            y, aux = nnx.merge(graphdef(), state)(x)
            return jnp.vdot(y.astype(jnp.float32), x.astype(jnp.float32)) + aux

        return jax.grad(objective, argnums=(0, 1))(state, x)

    return step


def _case(shape: MoEShape) -> Case:
    def make_inputs(key):
        k_x, k_params = jax.random.split(key)
        x = jax.random.normal(k_x, (shape.tokens, shape.dim), jnp.float32).astype(jnp.bfloat16)
        return x, nnx.state(shape.layer("xla", nnx.Rngs(k_params)))

    state = jax.eval_shape(lambda: make_inputs(jax.random.key(0))[1])
    param_bytes = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(state))
    min_bytes = 2 * (param_bytes + shape.tokens * shape.dim * 2)
    params = {"shape": f"{shape.tokens}x{shape.dim}_e{shape.experts}_k{shape.topk}_f{shape.ffn}", "dtype": "bfloat16",
              "flops": shape.matmul_flops}  # fmt: skip
    return Case.of_impls(FAMILY, f"moe_fwd_bwd/{shape.name}", make_inputs, lambda impl: _forward_backward(shape, impl), min_bytes, params)


MHC_SHAPES = ((4096, 4096), (16384, 4096), (4096, 7168), (16384, 7168))  # tokens, hidden


def _mhc_forward_backward(dim: int, impl: str, cotangent: bool = False):
    """One block's forward and backward: the objective ``vdot(block(residual), residual)`` (the input
    used twice, so its cotangent is the block's plus the new residual, added by XLA), or with
    ``cotangent`` ``vdot(block(residual), g)`` for a given ``g`` (the input's only use is the block, as
    in a network whose residual stream goes from block to block)."""
    from jax_tilek.nnx import HyperConnection

    graphdef = functools.cache(lambda: nnx.split(nnx.eval_shape(lambda: HyperConnection(jax.nn.silu, dim, 4, impl=impl, rngs=nnx.Rngs(0))))[0])

    def step(residual, *rest):
        *g, state = rest

        def objective(state, residual):
            other = g[0] if cotangent else residual
            return jnp.vdot(nnx.merge(graphdef(), state)(residual).astype(jnp.float32), other.astype(jnp.float32))

        return jax.grad(objective, argnums=(0, 1))(state, residual)

    return step


def _mhc_case(tokens: int, dim: int, cotangent: bool = False) -> Case:
    from jax_tilek.nnx import HyperConnection

    def make_inputs(key):
        k_x, k_g, k_params = jax.random.split(key, 3)
        residual = jax.random.normal(k_x, (tokens, 4, dim), jnp.float32).astype(jnp.bfloat16)
        g = (jax.random.normal(k_g, (tokens, 4, dim), jnp.float32).astype(jnp.bfloat16),) if cotangent else ()
        return residual, *g, nnx.state(HyperConnection(jax.nn.silu, dim, 4, impl="xla", rngs=nnx.Rngs(k_params)))

    min_bytes = 2 * tokens * 4 * dim * 2 * 2  # the residual read and written, forward and backward
    params = {"shape": f"{tokens}x4x{dim}", "dtype": "bfloat16"}
    name = f"mhc_block_fwd_bwd{'_cot' if cotangent else ''}/t{tokens}_h{dim}"
    return Case.of_impls(FAMILY, name, make_inputs, lambda impl: _mhc_forward_backward(dim, impl, cotangent), min_bytes, params)


CASES = [_case(s) for s in SHAPES] + [_mhc_case(t, d) for t, d in MHC_SHAPES] + [_mhc_case(16384, 4096, cotangent=True)]
# The mHC blocks with the partials GEMM in the other algorithms (benchmarks/bench_mhc.py).
VARIANTS = bench_mhc.gemm_variants([c for c in CASES if c.name.startswith("mhc_block_fwd_bwd/")])
