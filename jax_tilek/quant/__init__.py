"""Quantization family: FP8 / FP4 / E5M6 casts, fused SwiGLU and RMSNorm + quantize.

Shared formats, scale-factor rules and layouts are in :mod:`jax_tilek.quant.formats`.
"""
