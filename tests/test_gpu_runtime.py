"""The launcher inside XLA's runtime: command buffers, jax.export artifacts, the persistent cache.

Each case runs tests/gpu_programs.py in fresh processes, since XLA flags and caches are per process.
The build machine compiles the program's kernels and writes the exported artifact into the kernel
cache directory (``python tests/gpu_programs.py prepare sm_90a``), so the GPU machine finds both there.
"""

import json
import os
import subprocess
import sys

import pytest

from jax_tilek import config

import gpu_programs

HERE = os.path.dirname(__file__)
COMMAND_BUFFERS = {
    "on": "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1",
    "off": "--xla_gpu_enable_command_buffer=",
}


def _run(*args, **env) -> dict:
    full_env = dict(os.environ, **env)
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "gpu_programs.py"), *args], env=full_env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.gpu
def test_command_buffers_on_and_off_agree():
    runs = {mode: _run("run", XLA_FLAGS=flags, JAX_TILEK_LAUNCH_STATS="1") for mode, flags in COMMAND_BUFFERS.items()}
    assert runs["on"]["digest"] == runs["off"]["digest"] == runs["on"]["expected"]
    # Off: XLA calls the handler for every launch, never while capturing.
    assert runs["off"]["executions"] == runs["off"]["launches"] and runs["off"]["captured"] == 0
    # On: the handler ran while XLA captured a graph, and replays skipped it.
    assert runs["on"]["captured"] >= 1, runs["on"]
    assert runs["on"]["executions"] < runs["on"]["launches"], runs["on"]


@pytest.mark.gpu
def test_exported_program_runs_without_tilelang_or_cache(tmp_path):
    path = os.path.join(config.cache_dir(), "exports", gpu_programs.EXPORT_FILE)
    assert os.path.exists(path), f"{path} is written on the build machine (tests/gpu_programs.py prepare)"
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    out = _run("exported", path, JAX_TILEK_CACHE_DIR=str(empty), JAX_TILEK_OFFLINE="1")
    assert out["digest"] == out["expected"]
    assert list(empty.iterdir()) == []


@pytest.mark.gpu
def test_persistent_compilation_cache_in_a_fresh_process(tmp_path):
    first = _run("run-cached", str(tmp_path / "jax-cache"))
    second = _run("run-cached", str(tmp_path / "jax-cache"))
    assert first["digest"] == second["digest"] == first["expected"]
    assert first["cache_hits"] == 0 and second["cache_hits"] >= 1
