"""Settings from the environment."""

import pytest

import jax_tilek
from jax_tilek import config


@pytest.mark.parametrize("value", ["1", "on", "ON", "true", "Yes", " yes "])
def test_offline_switched_on(monkeypatch, value):
    monkeypatch.setenv("JAX_TILEK_OFFLINE", value)
    assert config.offline()


@pytest.mark.parametrize("value", ["0", "off", "False", "no", ""])
def test_offline_switched_off_means_compile_where_tilelang_is(monkeypatch, value):
    from jax_tilek.compiler import tilelang_available

    monkeypatch.setenv("JAX_TILEK_OFFLINE", value)
    assert config.offline() == (not tilelang_available())


@pytest.mark.parametrize("value", ["maybe", "2", "enabled"])
def test_offline_rejects_what_it_does_not_understand(monkeypatch, value):
    monkeypatch.setenv("JAX_TILEK_OFFLINE", value)
    with pytest.raises(ValueError, match=f"JAX_TILEK_OFFLINE={value!r} is not understood.*on/off"):
        config.offline()


def test_lock_timeout(monkeypatch):
    monkeypatch.setenv("JAX_TILEK_LOCK_TIMEOUT", "2.5")
    assert config.lock_timeout() == 2.5
    monkeypatch.setenv("JAX_TILEK_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="JAX_TILEK_LOCK_TIMEOUT"):
        config.lock_timeout()


def test_target_arch_is_scoped_and_checked():
    before = config.arch_override()
    with jax_tilek.target_arch("sm_100a"):
        assert config.arch_override() == "sm_100a"
        with jax_tilek.target_arch("sm_90a"):
            assert config.arch_override() == "sm_90a"
        assert config.arch_override() == "sm_100a"
    assert config.arch_override() == before
    with pytest.raises(ValueError, match="arch must be one of"):
        jax_tilek.target_arch("sm_80")


def test_public_names():
    assert jax_tilek.NoTargetArchError.__module__ == "jax_tilek.platform"
    assert set(jax_tilek.__all__) <= set(dir(jax_tilek))
