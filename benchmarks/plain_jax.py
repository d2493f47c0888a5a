"""Plain-JAX versions of common steps, for the "same op in XLA" side of fused-op benchmarks."""

import jax.numpy as jnp

from jax_tilek.quant import formats


def per_token_cast_e4m3(v, num_per_channels: int, layout: str):
    """e4m3 per-token cast in 1 x npc groups as a JAX user would write it (amax floor 1e-4; fp32 or,
    for the column-major layouts, power-of-two scales)."""
    t, h = v.shape
    g = v.astype(jnp.float32).reshape(t, h // num_per_channels, num_per_channels)
    a = jnp.maximum(jnp.max(jnp.abs(g), axis=-1), 1e-4)
    if layout == "row":
        sf, inv = a / 448, 448 / a
    else:
        e = formats.power_of_two_exponent(a / 448)
        sf, inv = formats.exp2_exact(e), formats.exp2_exact(-e)
    q = jnp.clip(g * inv[..., None], -448, 448).astype(jnp.float8_e4m3fn).reshape(t, h)
    return q, formats.store_sf(sf, layout)
