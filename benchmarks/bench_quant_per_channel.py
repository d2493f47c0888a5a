"""Per-channel FP8 casts at DeepSeek sizes against the same ops in plain JAX (their references)."""

import jax
import jax.numpy as jnp

from jax_tilek.quant import formats as F
from jax_tilek.quant.per_channel_cast import (
    _per_channel_cast_op,
    per_channel_cast,
    per_channel_cast_and_transpose,
    per_channel_cast_fused,
)

from benchmarks.harness import Case


def _bf16(t, h):
    return lambda key: ((jax.random.normal(key, (t, h), jnp.float32) * 4).astype(jnp.bfloat16),)


def _quant(t, h, npc=128):
    def make(key):
        x = jax.random.normal(key, (t, h), jnp.float32) * 4
        data, sf = F.quantize_blocks(x, "e4m3", (1, npc))
        return data, sf

    return make


def _gathered(t_in, h, t_out):
    def make(key):
        k1, k2 = jax.random.split(key)
        pos = jax.random.randint(k2, (t_out,), -1, t_in, jnp.int32)  # ~1/t_in of the rows are -1
        return _bf16(t_in, h)(k1)[0], pos

    return make


def _case(name, make, fn, t, h, *, read, npt=128, packed=False, **params):
    """``read``: input bytes; written: e4m3 data [T, H] and the scales."""
    m_b = -(-t // npt)
    sf_bytes = (-(-m_b // 4) if packed else m_b) * h * 4
    return Case(
        family="quant_per_channel",
        name=name,
        make_inputs=make,
        kernel=lambda *a: fn(*a, impl="tilelang"),
        xla=lambda *a: fn(*a, impl="xla"),
        min_bytes=read + t * h + sf_bytes,
        params={"shape": f"{t}x{h}", "dtype": "bfloat16", **params},
    )


def _cast(t, h, npt=128, round_sf=False, packed=False):
    fn = lambda x, impl: per_channel_cast(x, num_per_tokens=npt, round_sf=round_sf, use_packed_ue8m0=packed, impl=impl)
    name = f"cast_npt{npt}" + ("_ue8m0" if packed else "_round" if round_sf else "")
    return _case(name, _bf16(t, h), fn, t, h, read=2 * t * h, npt=npt, packed=packed)


def _cast_quant(t, h):
    fn = lambda x, s, impl: per_channel_cast((x, s), num_per_channels=128, impl=impl)
    c = _case("cast_from_e4m3", _quant(t, h), fn, t, h, read=t * h + t * (h // 128) * 4)
    c.params["dtype"] = "float8_e4m3fn"
    return c


def _fused_gather(t_in, h, t_out):
    fn = lambda x, p, impl: per_channel_cast_fused(x, pos_to_token=p, impl=impl)
    return _case("fused_gather", _gathered(t_in, h, t_out), fn, t_out, h, read=2 * t_out * h + 4 * t_out)


def _transpose(t, h, npt=128, round_sf=False):
    fn = lambda x, impl: per_channel_cast_and_transpose(x, num_per_tokens=npt, round_sf=round_sf, impl=impl)
    return _case(f"transpose_npt{npt}", _bf16(t, h), fn, t, h, read=2 * t * h, npt=npt)


CASES = [
    _cast(4096, 7168),
    _cast(16384, 7168),
    _cast(65536, 4096, npt=32, round_sf=True, packed=True),
    _cast_quant(16384, 7168),
    _fused_gather(8192, 7168, 16384),
    _transpose(16384, 7168),
    _transpose(65536, 4096, npt=32, round_sf=True),
]


def _tiled(t, h, tile_h, min_blocks, kind="bf16", fold=False):
    """The kernel with a fixed tiling, to compare tilings (``kind``: bf16, e4m3 input, transpose;
    ``fold``: the flat grid that more than 65,535 channel tiles take)."""
    quant = kind == "e4m3"
    fn = lambda *a, impl: _per_channel_cast_op(
        *a, impl=impl, npt=128, round_sf=False, sf_in="row" if quant else None,
        npc=128 if quant else None, packed_sf=False, gather=False, transpose=kind == "transpose",
        tile_h=tile_h, min_blocks=min_blocks, **({"fold": True} if fold else {}),
    )  # fmt: skip
    make = _quant(t, h) if quant else _bf16(t, h)
    read = t * h + t * (h // 128) * 4 if quant else 2 * t * h
    c = _case(f"{kind}_tile{tile_h}_mb{min_blocks}" + ("_flat" if fold else ""), make, fn, t, h, read=read)
    c.params["dtype"] = "float8_e4m3fn" if quant else "bfloat16"
    return c


VARIANTS = [
    _tiled(16384, 7168, 128, 3),
    _tiled(4096, 7168, 128, 2),
    _tiled(16384, 7168, 256, 2, "e4m3"),
    _tiled(16384, 7168, 128, 3, "e4m3"),
    _tiled(16384, 7168, 128, 4, "e4m3"),
    _tiled(16384, 7168, 128, 2, "transpose"),
    _tiled(16384, 7168, 128, 3, "transpose"),
    _tiled(16384, 7168, 256, 2, fold=True),  # against cast_npt128 at 16384x7168 (the 2-D grid)
]
