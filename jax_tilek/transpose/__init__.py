"""Transpose family: ``transpose`` and ``batched_transpose``."""

from jax_tilek.transpose._batched_transpose import batched_transpose, batched_transpose_kernel, transpose

__all__ = ["batched_transpose", "batched_transpose_kernel", "transpose"]
