"""The op contract for the GEMM-containing mHC functions and the composites."""

import jax
import jax.numpy as jnp

from jax_tilek import mhc
from jax_tilek.testing import OpContract, assert_trees_equal


class VmapWithinTolerance:
    """vmap against a loop within the case's tolerance: XLA's CPU dot (the split-K partials) rounds
    differently for a batched shape, and the composites carry that last-bit difference on."""

    def test_vmap_matches_a_loop(self, case, rng):
        draws = [case.arrays(rng) for _ in range(2)]
        call, _ = self.bound(case, None, draws[0])
        stacked = [jnp.stack([jnp.asarray(a) for a in pair]) for pair in zip(*(self.bound(case, None, d)[1] for d in draws))]
        batched = jax.jit(jax.vmap(call))(*stacked)
        expected = jax.tree.map(lambda *ys: jnp.stack(ys), *[call(*(s[k] for s in stacked)) for k in range(2)])
        assert_trees_equal(batched, expected, case.tolerance, what=f"{case.name} vmap")


class TestNormFn(VmapWithinTolerance, OpContract):
    fn = mhc.mhc_pre_norm_fn
    differentiable = (0, 1, 2)


class TestMerge(OpContract):
    fn = mhc.mhc_fn_normw_merge
    differentiable = (0, 1)


class TestReduce(OpContract):
    fn = mhc.mhc_reduce_partials_and_rmsnorm
    differentiable = (0, 1)


class TestPre(VmapWithinTolerance, OpContract):
    fn = mhc.mhc_pre
    differentiable = (0, 1, 2, 3, 4)


class TestBigFuse(VmapWithinTolerance, OpContract):
    fn = mhc.mhc_pre_big_fuse


class TestHead(VmapWithinTolerance, OpContract):
    fn = mhc.mhc_head
    differentiable = (0, 1, 2, 3, 4)


class TestRecompute(VmapWithinTolerance, OpContract):
    fn = mhc.mhc_multilayer_recompute
