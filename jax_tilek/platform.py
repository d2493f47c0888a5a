"""Which GPU architecture a kernel is compiled for when a program is lowered for "cuda"."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Iterator

import jax

from jax_tilek import config

# Compute capability -> the arch-specific target TileLang's Hopper/Blackwell code needs.
ARCH_BY_COMPUTE_CAPABILITY = {"9.0": "sm_90a", "10.0": "sm_100a", "10.3": "sm_103a"}

_log = logging.getLogger(__name__)


class NoTargetArchError(ValueError):
    """Lowering for "cuda" with no GPU present and no architecture given."""


def device_arch(device: jax.Device) -> str | None:
    """The kernel target for a CUDA device, or None when jax_tilek has no kernels for it."""
    return ARCH_BY_COMPUTE_CAPABILITY.get(str(getattr(device, "compute_capability", "")))


@functools.cache
def _local_gpu_arch() -> tuple[bool, str | None]:
    try:
        gpus = jax.devices("cuda")
    except RuntimeError:
        return False, None
    arch = device_arch(gpus[0])
    if arch is None:  # once per process (cached)
        _log.warning("%s (compute capability %s) is not a GPU jax_tilek has kernels for (Hopper sm_90, Blackwell sm_100/sm_103): "
                     "its ops run their pure-JAX references", gpus[0].device_kind, getattr(gpus[0], "compute_capability", "?"))
    return True, arch


def lowering_arch() -> str | None:
    """The architecture to compile for: explicit setting first, else the local GPU's.

    Returns None for a GPU jax_tilek has no kernels for (callers fall back to the reference).
    """
    override = config.arch_override()
    if override:
        return override
    has_gpu, arch = _local_gpu_arch()
    if not has_gpu:
        raise NoTargetArchError(
            "lowering for 'cuda' on a machine without an NVIDIA GPU: say which GPU to compile for with "
            "JAX_TILEK_ARCH=sm_90a (or sm_100a) or `with jax_tilek.target_arch('sm_90a'):`; to export or "
            "precompile a program, use jax_tilek.export(fn, *args, arch='sm_90a') or jax_tilek.precompile(...)"
        )
    return arch


# Multiprocessor counts for persistent grids when lowering without the GPU at hand (JAX_TILEK_NUM_SMS
# overrides); kernels must be correct for any grid size, only their speed depends on it.
DEFAULT_NUM_SMS = {"sm_90a": 132, "sm_100a": 148, "sm_103a": 148}


def num_sms(arch: str) -> int:
    """Streaming multiprocessors of the GPU a kernel is compiled for."""
    override = os.environ.get("JAX_TILEK_NUM_SMS")
    if override:
        return int(override)
    has_gpu, local_arch = _local_gpu_arch()
    if has_gpu and local_arch == arch:
        count = getattr(jax.devices("cuda")[0], "core_count", None)
        if count:
            return int(count)
    return DEFAULT_NUM_SMS[arch]


_lowering = threading.local()


@contextlib.contextmanager
def lowering_target(arch: str) -> Iterator[None]:
    """Marks the architecture a kernel launch is being prepared for (set by the op's CUDA lowering)."""
    old = getattr(_lowering, "arch", None)
    _lowering.arch = arch
    try:
        yield
    finally:
        _lowering.arch = old


def target_arch() -> str:
    """The architecture of the kernel launch being prepared; for use inside an op's ``launch``."""
    arch = getattr(_lowering, "arch", None)
    if arch is None:
        raise RuntimeError("target_arch() is only defined while an op is lowered for 'cuda'")
    return arch


def target_num_sms() -> int:
    """Multiprocessors of the GPU being compiled for; for sizing persistent grids inside ``launch``."""
    return num_sms(target_arch())


def kernels_available() -> bool:
    """True when the default backend is a GPU that jax_tilek has kernels for."""
    try:
        return jax.default_backend() == "gpu" and _local_gpu_arch()[1] is not None
    except RuntimeError:
        return False
