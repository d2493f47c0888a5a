"""What the package ships and declares, and where the tests keep their files."""

import os
import subprocess
import tomllib

import jax_tilek
from conftest import ROOT


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_license_and_typing_marker():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert _pyproject()["project"]["license"] == {"text": "Apache-2.0"}
    assert os.path.isfile(os.path.join(ROOT, "jax_tilek", "py.typed"))


def test_dependencies_and_extras():
    project = _pyproject()["project"]
    assert not any(d.startswith("flax") for d in project["dependencies"])  # nothing imports it yet
    extras = project["optional-dependencies"]
    assert any(d.startswith("flax") for d in extras["nnx"])
    assert any(d.startswith("jax[cuda13]") for d in extras["cuda"])
    from jax_tilek import compiler

    assert f"nvidia-cuda-nvcc=={compiler.NVCC_VERSION}" in extras["compile"]
    assert f"tilelang=={compiler.TILELANG_VERSION}" in extras["compile"]


def test_tests_keep_kernels_in_an_explicit_ignored_directory():
    # conftest: JAX_TILEK_CACHE_DIR as given, else the checkout's .tilek_cache/ (never ~/.cache by default)
    cache_dir = os.environ["JAX_TILEK_CACHE_DIR"]
    assert jax_tilek.config.cache_dir() == os.path.abspath(cache_dir)
    for path in (".tilek_cache/x.json", ".tilek_ship/step.jaxexport"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert ignored.returncode in (0, 128), path  # 128: not a git checkout (an unpacked source tree)
