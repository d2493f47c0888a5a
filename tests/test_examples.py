"""The examples and README's code blocks run as written (on CPU they take the reference path)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, require_nvcc

EXAMPLES = os.path.join(ROOT, "examples")


def _run(args, cwd, timeout=600):
    env = dict(os.environ)  # conftest set JAX_TILEK_CACHE_DIR and PYTHONPATH (the checkout)
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("script", ["transpose_in_jit.py", "bring_your_own_kernel.py"])
def test_example_runs(tmp_path, script):
    _run([os.path.join(EXAMPLES, script)], tmp_path)


def test_ship_the_cache_builds_then_runs_the_shipped_files(tmp_path):
    pytest.importorskip("tilelang")
    require_nvcc()
    ship = tmp_path / "ship"
    _run([os.path.join(EXAMPLES, "ship_the_cache.py"), "build", str(ship)], tmp_path)
    assert (ship / "step.jaxexport").is_file() and list((ship / "kernels").glob("*/*/*.json"))
    assert not list(ship.rglob("*.lock"))
    out = _run([os.path.join(EXAMPLES, "ship_the_cache.py"), "run", str(ship)], tmp_path)
    assert "exported program agrees" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ship"]  # nothing written beside it


def readme_python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.parametrize("index", range(len(readme_python_blocks())))
def test_readme_python_block_runs(tmp_path, index):
    code = readme_python_blocks()[index]
    if "precompile(" in code or "export(" in code:
        pytest.importorskip("tilelang")
        require_nvcc()
    _run(["-c", code], tmp_path)
