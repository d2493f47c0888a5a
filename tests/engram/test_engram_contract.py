"""The op contract (jax_tilek.testing.OpContract) for every Engram op, on its named cases (ARG_SPECS):
abstract eval, the default path off the GPU, lowering to the declared launches (kernels compiled for
sm_90a), vmap, gradients, token sharding, export, bad inputs, and on a GPU the kernel against the
reference."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import engram
from jax_tilek.testing import OpContract, assert_trees_equal

S = jax.ShapeDtypeStruct
BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32


class VmapWithinTolerance:
    """vmap against a loop within the case's tolerance: XLA's CPU reductions over H (the references'
    sums) may round differently for a batched shape."""

    def vmap_tolerance(self, case):
        return case.tolerance


class ShardingWithinTolerance:
    """Token sharding within the case's tolerance (each device's reference sums its own rows; XLA may
    round a per-device reduction differently from the global one)."""

    def test_token_sharding(self, case, rng):
        import re

        import pytest
        from jax.sharding import NamedSharding, PartitionSpec

        devices = jax.devices("cpu")
        f, arrays = self.jitted(case, None, case.arrays(rng))
        if len(devices) < 8 or np.shape(arrays[0])[0] % 8 or not np.shape(arrays[0])[0]:
            pytest.skip("needs 8 host devices and a token count divisible by 8")
        mesh = jax.make_mesh((8,), ("d",), devices=devices[:8])
        sharded = [jax.device_put(arrays[0], NamedSharding(mesh, PartitionSpec("d"))), *arrays[1:]]
        assert_trees_equal(f(*sharded), f(*arrays), case.tolerance, what=f"{case.name} sharded")
        hlo = f.lower(*sharded).compile().as_text()
        assert not re.search(r"all-gather|all-to-all|collective-permute|all-reduce", hlo), "sharded tokens were exchanged"


def _words():
    return S((2, 3, 2), jnp.uint32)


class TestHash(OpContract):
    fn = engram.engram_hash
    rows = True
    bad_inputs = [
        ((S((8, 3), jnp.int64 if jax.config.jax_enable_x64 else jnp.float32), _words(), S((2, 2, 4), I32), S((2, 8), I32)), {}, ValueError,
         "ngram_token_ids must be int32"),
        ((S((8, 1), I32), S((2, 1, 2), jnp.uint32), S((2, 0, 4), I32), S((2, 0), I32)), {}, ValueError, "2 <= N"),
        ((S((8, 3), I32), S((2, 4, 2), jnp.uint32), S((2, 2, 4), I32), S((2, 8), I32)), {}, ValueError, "multipliers must be"),
        ((S((8, 3), I32), _words(), S((2, 3, 4), I32), S((2, 8), I32)), {}, ValueError, "vocab_sizes must be"),
        ((S((8, 3), I32), _words(), S((2, 2, 4), I32), S((2, 9), I32)), {}, ValueError, "offsets must have shape"),
        ((S((8, 3), I32), _words(), S((2, 2, 4), I32), S((2, 8), I32), S((7,), jnp.bool_)), {}, ValueError, "image_token_mask must have shape"),
        ((S((8, 3), I32), S((2, 3), F32), S((2, 2, 4), I32), S((2, 8), I32)), {}, ValueError, "multipliers must be int64"),
    ]  # fmt: skip


class TestFusedWeight(OpContract):
    fn = engram.fused_weight
    bad_inputs = [
        ((S((4, 100), BF16), S((4, 100), BF16)), {}, ValueError, "multiple of 8"),
        ((S((4, 128), BF16), S((4, 256), BF16)), {}, ValueError, "must have one shape"),
        ((S((4, 128), jnp.float16), S((4, 128), BF16)), {}, ValueError, "weight_hidden must be bfloat16 or float32"),
        ((S((17, 128), BF16), S((17, 128), BF16)), {}, ValueError, r"hc_mult\) must be in \[1, 16\]"),
    ]  # fmt: skip


class TestGateFwd(VmapWithinTolerance, ShardingWithinTolerance, OpContract):
    fn = engram.engram_gate_fwd
    rows = True
    bad_inputs = [
        ((S((8, 4, 256), F32), S((8, 5, 256), BF16), S((4, 256), F32)), {}, ValueError, "hidden_states must be bfloat16"),
        ((S((8, 4, 256), BF16), S((8, 4, 256), BF16), S((4, 256), F32)), {}, ValueError, r"kv must be \[..., hc \+ 1, H\]"),
        ((S((8, 4, 256), BF16), S((8, 5, 256), BF16), S((4, 256), BF16)), {}, ValueError, "weight_fused must be float32"),
        ((S((8, 4, 256), BF16), S((8, 5, 256), BF16), S((4, 256), F32)), dict(clamp_value=0.0), ValueError, "clamp_value must be a positive"),
        ((S((8, 4, 256), BF16), S((8, 5, 256), BF16), S((4, 256), F32)), dict(eps=-1.0), ValueError, "eps must be"),
        ((S((8, 4, 256), BF16), S((8, 5, 256), BF16), S((4, 256), F32)), dict(image_token_mask=S((8,), I32)), ValueError,
         "image_token_mask must be bool"),
        ((S((8, 4, 260), BF16), S((8, 5, 260), BF16), S((4, 260), F32)), {}, ValueError, "multiple of 8"),
    ]  # fmt: skip


class TestGateBwd(VmapWithinTolerance, OpContract):
    fn = engram.engram_gate_bwd
    bad_inputs = [
        ((S((8, 4, 256), F32), S((8, 4, 256), BF16), S((8, 5, 256), BF16), S((4, 256), F32), *[S((8, 4), F32)] * 4), {}, ValueError,
         "grad_out must be bfloat16"),
        ((S((8, 4, 256), BF16), S((8, 4, 256), BF16), S((8, 5, 256), BF16), S((4, 256), F32), *[S((8, 4), F32)] * 3, S((8, 3), F32)), {},
         ValueError, r"rstd_k must have shape \[8, 4\]"),
    ]  # fmt: skip


class TestGradWReduce(OpContract):
    fn = engram.grad_w_reduce
    bad_inputs = [
        ((S((132, 4, 256), F32), S((4, 256), BF16), S((4, 256), BF16), S((4, 128), F32)), {}, ValueError, "grad_weight_hidden must have shape"),
        ((S((132, 4, 128), F32), S((4, 256), BF16), S((4, 256), BF16)), {}, ValueError, r"grad_w_partial must be \[P, hc, H\]"),
    ]  # fmt: skip


class TestGate(VmapWithinTolerance, ShardingWithinTolerance, OpContract):
    fn = engram.engram_gate
    rows = True
    differentiable = (0, 1, 2, 3)
    bad_inputs = [
        ((S((8, 4, 256), BF16), S((8, 5, 256), BF16), S((4, 128), BF16), S((4, 128), BF16)), {}, ValueError, r"weights must be \[hc, H\]"),
        ((S((8, 4, 256), BF16), S((8, 1024), BF16), S((4, 256), BF16), S((4, 256), BF16)), {}, ValueError, r"kv must be"),
    ]  # fmt: skip


class TestSinkhornMomentum(OpContract):
    fn = engram.engram_sinkhorn_momentum_update
    rows = True
    bad_inputs = [
        ((S((256,), jnp.float16), S((256,), F32), 0.9), {}, ValueError, "grad must be bfloat16 or float32"),
        ((S((256,), F32), S((512,), F32), 0.9), {}, ValueError, "must have one shape"),
        ((S((256,), F32), S((256,), F32), 0.9), dict(nesterov=1), TypeError, "nesterov must be True or False"),
    ]  # fmt: skip


class TestSinkhornStep(OpContract):
    fn = engram.engram_sinkhorn_step
    bad_inputs = [
        ((S((16, 6), F32), S((16,), F32), S((6,), F32)), {}, ValueError, "multiple of 4"),
        ((S((16, 8), F32), S((15,), F32), S((8,), F32)), {}, ValueError, r"row_scale must be \[R\]"),
        ((S((16, 8), BF16), S((16,), F32), S((8,), F32)), {}, ValueError, "matrix must be float32"),
    ]  # fmt: skip


class TestSinkhornStepReduce(OpContract):
    fn = engram.engram_sinkhorn_step_reduce
    bad_inputs = [((S((0, 8), F32),), {}, ValueError, r"col_sumsq_partial must be \[P, D\]")]


class TestSinkhornColUpdate(OpContract):
    fn = engram.engram_sinkhorn_col_update
    bad_inputs = [
        ((S((4, 8), F32), S((8,), F32), 0), {}, ValueError, "num_rows must be positive"),
        ((S((4, 8), F32), S((4,), F32), 10), {}, ValueError, r"col_scale must be \[D\]"),
    ]  # fmt: skip


class TestSinkhornFinalize(OpContract):
    fn = engram.engram_sinkhorn_finalize
    rows = True
