"""RoPE family: rotary position embedding (TileKernels v2.1 ``transform.apply_rotary``, v2 §2.5), functional.

:func:`apply_rotary` rotates query and key heads (``[T, heads, D]`` or ``[B, S, heads, D]``, bf16, fp16 or
fp32) by a float32 ``cos_sin_cache [S_ro, rot]`` (cos | sin halves, rot 64 or 128), NeoX (rotate-half) or
GPT-J (interleaved) pairs, at rows ``seqlen_offset + positions`` (or the tokens' sequence indices), in
one kernel launch for both tensors. A rotary window of ``rot`` columns inside a larger head dim
(partial rotary, e.g. DeepSeek's ``q[..., -64:]``) is chosen with ``columns``; the other columns come back
unchanged. Differentiable in query and key: the backward is the conjugate rotation on the same kernel.

:func:`make_cos_sin_cache` builds the table for the usual frequencies ``base^(-2i/rot)``.
See :mod:`jax_tilek.rope._apply_rotary` for the arithmetic and the kernel's layout.
"""

from jax_tilek.rope._apply_rotary import RotaryConfig, apply_rotary, rotary_kernel
from jax_tilek.rope._cache import make_cos_sin_cache

__all__ = ["RotaryConfig", "apply_rotary", "make_cos_sin_cache", "rotary_kernel"]
