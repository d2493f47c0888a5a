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
ON = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
COMMAND_BUFFERS = {  # mode -> environment
    "on": {"XLA_FLAGS": ON},  # stream capture into child graphs (the default)
    "on_record": {"XLA_FLAGS": ON, "JAX_TILEK_RECORD": "1"},  # kernel nodes from the record stage, where the launcher has it
    "off": {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="},
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
    runs = {mode: _run("run", JAX_TILEK_LAUNCH_STATS="1", **env) for mode, env in COMMAND_BUFFERS.items()}
    assert runs["on"]["digest"] == runs["on_record"]["digest"] == runs["off"]["digest"] == runs["on"]["expected"]
    # Off: XLA calls the execute handler for every launch, never while capturing, and never records.
    off = runs["off"]
    assert off["executions"] == off["launches"] and off["captured"] == 0 and off["records"] == 0, off
    # Stream capture: the handler ran while XLA captured a graph, and replays skipped it.
    capture = runs["on"]
    assert capture["captured"] >= 1 and capture["executions"] < capture["launches"] and capture["records"] == 0, capture
    # Record stage (where the launcher has it): the twin target registered, kernel nodes recorded, no
    # stream capture of those call sites.
    record = runs["on_record"]
    assert record["executions"] < record["launches"], record
    if record["record_stage"]:
        assert record["record_target"] and record["records"] >= 1 and record["captured"] < capture["captured"], record
    else:
        assert record["records"] == 0 and record["captured"] >= 1, record


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
