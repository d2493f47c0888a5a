"""The examples run as written (on CPU they take the reference path)."""

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.mark.parametrize("script,args", [("transpose_in_jit.py", []), ("bring_your_own_kernel.py", []), ("ship_the_cache.py", ["build"])])
def test_example_runs(tmp_path, script, args):
    env = dict(os.environ, JAX_TILEK_CACHE_DIR=os.environ.get("JAX_TILEK_CACHE_DIR", str(tmp_path / "cache")))
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
