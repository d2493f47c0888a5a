"""The cos/sin table that :func:`jax_tilek.rope.apply_rotary` reads."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_tilek import checks


def make_cos_sin_cache(rot_dim: int, max_positions: int, base: float = 10000.0, scale: float = 1.0) -> jax.Array:
    """float32 ``[max_positions, rot_dim]``: row ``p`` is ``[cos(p·θ) | sin(p·θ)]`` with
    ``θ_i = base^(-2i / rot_dim)`` for ``i < rot_dim / 2``, ``p`` divided by ``scale`` (linear position
    interpolation; 1 for none). The angles are computed in float32 from the integer positions."""
    name = "make_cos_sin_cache"
    rot_dim = checks.static_int(name, "rot_dim", rot_dim)
    max_positions = checks.static_int(name, "max_positions", max_positions)
    base = checks.static_number(name, "base", base, positive=True, optional=False)
    scale = checks.static_number(name, "scale", scale, positive=True, optional=False)
    if rot_dim <= 0 or rot_dim % 2:
        raise ValueError(f"{name}: rot_dim must be a positive even number, got {rot_dim}")
    if max_positions < 1:
        raise ValueError(f"{name}: max_positions must be at least 1, got {max_positions}")
    inv_freq = 1.0 / (base ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))
    angles = (jnp.arange(max_positions, dtype=jnp.float32) / jnp.float32(scale))[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
