"""2-D block casts at DeepSeek sizes against the same ops in plain JAX (their references):
per_block_cast (bf16 / fp32 -> e4m3 / e2m1), per_block_cast_lossless (FP4 -> FP8) and
batched_transpose_weight_sf (weight scales -> DeepGEMM UE8M0)."""

import jax
import jax.numpy as jnp

from jax_tilek.quant import formats as F
from jax_tilek.quant.per_block_cast import per_block_cast, per_block_cast_with_precomputed_sf, per_block_cast_with_sf_only
from jax_tilek.quant.per_block_cast_lossless import per_block_cast_lossless
from jax_tilek.quant.weight_sf import batched_transpose_weight_sf

from benchmarks.harness import Case

FAMILY = "quant_per_block"
SF_FLAGS = {"row": (False, False, False), "row_round": (False, True, False), "col_ue8m0": (True, True, True)}


def _sf_bytes(layout, num_blocks):
    shape, dtype = F.sf_storage_shape("row" if layout == "row_round" else layout, num_blocks)
    return shape[0] * shape[1] * dtype.itemsize


def _cast(t, h, dtype, fmt, block, sf):
    col, round_sf, packed = SF_FLAGS[sf]
    fn = lambda x, impl: per_block_cast(x, fmt, block, col, round_sf, packed, impl=impl)  # noqa: E731
    size = jnp.dtype(dtype).itemsize
    return Case(
        family=FAMILY,
        name=f"cast_{fmt}_{block[0]}x{block[1]}_{sf}",
        make_inputs=lambda key: ((jax.random.normal(key, (t, h), jnp.float32) * 4).astype(dtype),),
        kernel=lambda x: fn(x, "tilelang"),
        xla=lambda x: fn(x, "xla"),
        min_bytes=t * h * size + t * h * (1 if fmt == "e4m3" else 0.5) + _sf_bytes(sf, F.num_blocks((t, h), block)),
        params={"shape": f"{t}x{h}", "dtype": jnp.dtype(dtype).name},
    )


def _split(t, h, block):
    """The two halves of per_block_cast (e4m3, bf16 in, row-major fp32 scales): scales only, and the
    cast with those scales given."""

    def make_x(key):
        return ((jax.random.normal(key, (t, h), jnp.float32) * 4).astype(jnp.bfloat16),)

    def make_x_sf(key):
        (x,) = make_x(key)
        return x, per_block_cast_with_sf_only(x, "e4m3", block, impl="xla")

    sf_only = lambda impl: lambda x: per_block_cast_with_sf_only(x, "e4m3", block, impl=impl)  # noqa: E731
    with_sf = lambda impl: lambda x, sf: per_block_cast_with_precomputed_sf(x, "e4m3", block, sf, impl=impl)  # noqa: E731
    sf_bytes = _sf_bytes("row", F.num_blocks((t, h), block))
    params = {"shape": f"{t}x{h}", "dtype": "bfloat16"}
    name = f"e4m3_{block[0]}x{block[1]}_row"
    return [
        Case.of_impls(FAMILY, f"sf_only_{name}", make_x, sf_only, t * h * 2 + sf_bytes, params),
        Case.of_impls(FAMILY, f"precomputed_sf_{name}", make_x_sf, with_sf, t * h * 3 + sf_bytes, params),
    ]


def _lossless(t, h, out_block, in_layout, out_layout):
    x_block = (1, 32)
    in_blocks = F.num_blocks((t, h), x_block)

    def make(key):
        k1, k2 = jax.random.split(key)
        data = jax.random.bits(k1, (t, h // 2), jnp.uint8)
        exponents = jax.random.randint(k2, in_blocks, 120, 131, jnp.int32)  # scales within 2^11
        sf = jax.lax.bitcast_convert_type(exponents << 23, jnp.float32)
        return data, F.store_sf(sf, in_layout)

    col, _, packed = SF_FLAGS[out_layout]
    fn = lambda d, s, impl: per_block_cast_lossless(  # noqa: E731
        (d, s), "e4m3", x_block, out_block, col, True, packed, x_sf_layout=in_layout, impl=impl
    )
    return Case(
        family=FAMILY,
        name=f"lossless_1x32_to_{out_block[0]}x{out_block[1]}_{in_layout}_{out_layout}",
        make_inputs=make,
        kernel=lambda d, s: fn(d, s, "tilelang"),
        xla=lambda d, s: fn(d, s, "xla"),
        min_bytes=t * h // 2 + _sf_bytes(in_layout, in_blocks) + t * h + _sf_bytes(out_layout, F.num_blocks((t, h), out_block)),
        params={"shape": f"{t}x{h}", "dtype": "e2m1"},
    )


def _weight_sf():
    """One layer's MoE weights: 256 experts of w13 (4096 x 7168 -> sf 32 x 56) and w2 (7168 x 2048 -> 56 x 16)."""
    shapes = [(256, 32, 56), (256, 56, 16)]

    def make(key):
        keys = jax.random.split(key, len(shapes))
        return tuple(jax.lax.bitcast_convert_type(jax.random.randint(k, s, 100, 140, jnp.int32) << 23, jnp.float32) for k, s in zip(keys, shapes))

    out_words = sum(g * (-(-k // 4) * n * 128 + -(-n // 4) * k * 128) for g, n, k in shapes)
    fn = lambda *s, impl: batched_transpose_weight_sf(list(s), 128, [False] * len(s), impl=impl)  # noqa: E731
    return Case(
        family=FAMILY,
        name="weight_sf_moe_layer",
        make_inputs=make,
        kernel=lambda *s: fn(*s, impl="tilelang"),
        xla=lambda *s: fn(*s, impl="xla"),
        min_bytes=sum(g * n * k * 4 for g, n, k in shapes) + out_words * 4,
        params={"shape": "256x(32x56,56x16)", "dtype": "float32"},
    )


CASES = [
    _cast(16384, 7168, jnp.bfloat16, "e4m3", (128, 128), "col_ue8m0"),
    _cast(65536, 4096, jnp.bfloat16, "e4m3", (32, 32), "row_round"),
    _cast(8192, 7168, jnp.float32, "e4m3", (128, 128), "row_round"),
    _cast(32768, 7168, jnp.bfloat16, "e2m1", (32, 32), "col_ue8m0"),
    *_split(16384, 7168, (128, 128)),
    _lossless(16384, 7168, (128, 128), "col_ue8m0", "col_ue8m0"),
    _lossless(65536, 4096, (1, 128), "row", "row"),
    _weight_sf(),
    # More token tiles than grid y's 65,535: the flat grid.
    _cast(2_162_688, 512, jnp.bfloat16, "e4m3", (32, 32), "col_ue8m0"),
    _lossless(2_162_688, 512, (32, 32), "col_ue8m0", "row"),
]
