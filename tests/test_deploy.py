"""precompile / export across GPU architectures in one process, and plain jax.export."""

import hashlib
import re
import struct

import jax
import jax.numpy as jnp
import pytest

import jax_tilek
from jax_tilek import config

import byo_kernels
from conftest import HAS_GPU

PARAMS = dict(n_cols=256, dtype="float32")
X = jax.ShapeDtypeStruct((64, 256), jnp.float32)
SM = {"sm_90a": 90, "sm_100a": 100}


def _scale(x):
    return jax_tilek.tilelang_call(
        byo_kernels.scale_rows, x, jnp.ones((x.shape[0],), jnp.float32),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), params=PARAMS,
        reference=lambda x, s: x * s[:, None],
    )  # fmt: skip


def _fresh_program():
    """A function JAX has never traced, so every test starts with cold JAX caches."""

    def step(x):
        return _scale(x) + 1

    return step


def _cubin_sm(cubin: bytes) -> int:
    """The SM version a cubin is built for (CUDA ELF e_flags, bits 8-15)."""
    assert cubin[:4] == b"\x7fELF"
    return (struct.unpack_from("<I", cubin, 48)[0] >> 8) & 0xFF


def _cubin_keys(exported) -> set[str]:
    return set(re.findall(r'cubin_key = "([0-9a-f]{64})"', exported.mlir_module()))


def _expected_key(arch: str) -> str:
    cubin = byo_kernels.scale_rows.artifact(PARAMS, arch).cubin
    assert _cubin_sm(cubin) == SM[arch]
    return hashlib.sha256(cubin).hexdigest()


@pytest.mark.parametrize("order", [("sm_90a", "sm_100a"), ("sm_100a", "sm_90a")])
def test_each_architecture_gets_its_own_kernels(order):
    pytest.importorskip("tilelang")
    step = _fresh_program()
    for arch in order:
        used = jax_tilek.precompile(step, X, arch=arch)
        assert [(name.rsplit(".", 1)[-1], a) for name, _, a, _ in used] == [("scale_rows", arch)], used
        exported = jax_tilek.export(step, X, arch=arch)
        assert _cubin_keys(exported) == {_expected_key(arch)}
    # Back to the first architecture: JAX's caches now hold both, each under its own key.
    assert _cubin_keys(jax_tilek.export(step, X, arch=order[0])) == {_expected_key(order[0])}


def test_precompile_reports_every_kernel_each_time():
    pytest.importorskip("tilelang")
    step = _fresh_program()
    first = jax_tilek.precompile(step, X, arch="sm_90a")
    assert first and jax_tilek.precompile(step, X, arch="sm_90a") == first


def test_plain_jax_export_works_inside_target_arch():
    pytest.importorskip("tilelang")
    step = _fresh_program()
    with jax_tilek.target_arch("sm_90a"):
        exported = jax.export.export(jax.jit(step), platforms=["cuda"])(X)
    assert _cubin_keys(exported) == {_expected_key("sm_90a")}
    again = jax.export.deserialize(exported.serialize())
    assert "stablehlo.custom_call @tilek_launch" in again.mlir_module()


@pytest.mark.skipif(HAS_GPU or config.arch_override() is not None, reason="needs a machine without a GPU or JAX_TILEK_ARCH")
def test_plain_jax_export_without_an_architecture_is_a_short_error():
    with pytest.raises(jax_tilek.NoTargetArchError) as error:
        jax.export.export(jax.jit(_fresh_program()), platforms=["cuda"])(X)
    message = str(error.value)
    assert len(message) < 600, message
    assert "jax_tilek.export(" in message and "target_arch" in message


class _RecordingLauncher:
    """Stands in for a launcher whose XLA took the record-stage twin target."""

    def __init__(self, wrapped, registers: bool):
        self._wrapped, self.registers, self.calls = wrapped, registers, []

    def register_record_target(self, name, platform):
        self.calls.append((name, platform))
        return self.registers

    def __getattr__(self, name):
        return getattr(self._wrapped, name)


def _targets(module_text: str) -> set[str]:
    return set(re.findall(r"stablehlo\.custom_call @(\w+)", module_text))


@pytest.mark.parametrize("registers", [True, False])
def test_record_stage_target_is_opt_in_and_never_exported(monkeypatch, registers):
    pytest.importorskip("tilelang")
    from jax_tilek import _ffi

    launcher = _RecordingLauncher(_ffi._launcher(), registers)
    monkeypatch.setattr(_ffi, "_launcher", lambda: launcher)
    monkeypatch.setattr(_ffi, "_record_target_registered", False)
    lower = lambda: jax.jit(_fresh_program()).trace(X).lower(lowering_platforms=("cuda",)).as_text()  # noqa: E731
    with jax_tilek.target_arch("sm_90a"):
        monkeypatch.delenv("JAX_TILEK_RECORD", raising=False)
        assert _targets(lower()) == {"tilek_launch"} and launcher.calls == []
        monkeypatch.setenv("JAX_TILEK_RECORD", "1")
        assert _targets(lower()) == {"tilek_launch_record" if registers else "tilek_launch"}
        assert launcher.calls[0] == ("tilek_launch_record", "CUDA")
        lower()  # registered once; retried while XLA has not been seen
        assert len(launcher.calls) == (1 if registers else 2)
        exported = jax_tilek.export(_fresh_program(), X, arch="sm_90a")
    assert _targets(exported.mlir_module()) == {"tilek_launch"}
