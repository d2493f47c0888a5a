"""The kernel cache: addressing, atomic entries, checksums, offline mode, concurrent compiles."""

import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest

from jax_tilek import cache, config
from jax_tilek.cache import CacheError, KernelNotCompiledError
from jax_tilek.compiler import Artifact
from jax_tilek.kernel import TileKernel, canonical_param, clear_memory_cache, kernel
from jax_tilek.spec import DeviceKernel, KernelArg, LaunchSpec, TensorParam

TOOLCHAIN = {"tilelang": "0.1.15", "nvcc": "13.0.88"}
FIELDS = {"kernel": "k", "source": "abc", "params": {"n": 1}, "pass_configs": {}, "arch": "sm_90a", "spec_format": 1}


def _artifact(tag: bytes = b"1") -> Artifact:
    spec = LaunchSpec(
        "k",
        (TensorParam("x", "float32", ("M",), None),),
        (DeviceKernel("k_kernel", ("M", 1, 1), (32, 1, 1), 0, (1, 1, 1), False, False, (KernelArg("buffer", "x"),)),),
    )
    return Artifact(cubin=b"\x7fELF" + tag * 100, spec=spec, source="// cuda")


def test_miss_compiles_once_then_hits(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return _artifact()

    a = cache.get_or_compile(FIELDS, TOOLCHAIN, build, root=str(tmp_path))
    b = cache.get_or_compile(FIELDS, TOOLCHAIN, build, root=str(tmp_path))
    assert len(calls) == 1
    assert a.cubin == b.cubin and a.spec == b.spec
    (path,) = glob.glob(str(tmp_path / "*" / "*" / "*.json"))
    assert os.path.basename(os.path.dirname(os.path.dirname(path))) == "nvcc13.0.88-tilelang0.1.15"
    assert os.path.basename(path) == cache.entry_key(FIELDS) + ".json"


def test_key_covers_every_field():
    keys = {cache.entry_key(FIELDS)}
    for name, value in [("params", {"n": 2}), ("arch", "sm_100a"), ("source", "abd"), ("kernel", "j"),
                        ("pass_configs", {"tl.enable_fast_math": True}), ("spec_format", 2)]:  # fmt: skip
        keys.add(cache.entry_key({**FIELDS, name: value}))
    assert len(keys) == 7


@pytest.mark.parametrize("damage", ["truncate", "flip_cubin", "flip_spec"])
def test_corrupted_entry_is_rebuilt_never_used(tmp_path, damage):
    cache.get_or_compile(FIELDS, TOOLCHAIN, lambda: _artifact(b"1"), root=str(tmp_path))
    (path,) = glob.glob(str(tmp_path / "*" / "*" / "*.json"))
    data = open(path, "rb").read()
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        entry = json.loads(data)
        if damage == "flip_cubin":
            entry["cubin_z"] = cache._pack(b"\x7fELF" + b"2" * 100)
        else:
            entry["spec"] = entry["spec"].replace('"M"', '"N"')
        data = json.dumps(entry).encode()
    open(path, "wb").write(data)

    with pytest.raises(CacheError, match="corrupted cache entry"):
        cache.lookup_offline(FIELDS, root=str(tmp_path))
    with pytest.warns(UserWarning, match="rebuilding corrupted"):
        rebuilt = cache.get_or_compile(FIELDS, TOOLCHAIN, lambda: _artifact(b"3"), root=str(tmp_path))
    assert rebuilt.cubin == _artifact(b"3").cubin
    assert cache.lookup_offline(FIELDS, root=str(tmp_path)).cubin == _artifact(b"3").cubin


def test_offline_finds_entries_of_any_toolchain(tmp_path):
    cache.get_or_compile(FIELDS, {"tilelang": "0.1.15", "nvcc": "12.9.1"}, lambda: _artifact(b"7"), root=str(tmp_path))
    assert cache.lookup_offline(FIELDS, root=str(tmp_path)).cubin == _artifact(b"7").cubin


def test_offline_miss_names_kernel_and_configuration(tmp_path):
    with pytest.raises(KernelNotCompiledError, match=r"kernel 'k' \(n=1\) for sm_90a is not in the kernel cache"):
        cache.lookup_offline(FIELDS, root=str(tmp_path))


def test_canonical_params():
    import jax.numpy as jnp
    import numpy as np

    assert canonical_param({"b": (1, 2), "a": jnp.bfloat16, "c": np.int64(3)}) == {"a": "bfloat16", "b": [1, 2], "c": 3}
    with pytest.raises(TypeError, match="is not a number, string, dtype or tuple"):
        canonical_param(object())


def test_source_digest_follows_the_kernel_module(tmp_path, monkeypatch):
    module = tmp_path / "user_kernels.py"
    module.write_text("def factory(n):\n    return n\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("user_kernels")
    first = kernel(mod.factory).source_digest
    assert first == kernel(mod.factory).source_digest
    module.write_text("def factory(n):\n    return n + 0\n")
    mod = importlib.reload(mod)
    assert kernel(mod.factory).source_digest != first


_RACER = textwrap.dedent(
    """
    import sys, time
    from jax_tilek import compiler
    from jax_tilek.kernel import kernel
    sys.path.insert(0, sys.argv[2])
    import byo_kernels

    real = compiler.compile_prim_func
    def logged(*args, **kwargs):
        with open(sys.argv[1], "a") as f:
            f.write("compile\\n")
        time.sleep(1.0)  # widen the window in which the other processes miss
        return real(*args, **kwargs)
    compiler.compile_prim_func = logged
    art = byo_kernels.scale_rows.artifact({"n_cols": 128, "dtype": "float32", "block_m": 2}, "sm_90a")
    print(art.cubin.hex()[:64], len(art.cubin))
    """
)


def test_processes_compiling_the_same_kernel_at_once(tmp_path):
    pytest.importorskip("tilelang")
    log = tmp_path / "compiles.log"
    env = dict(os.environ, JAX_TILEK_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    env.pop("JAX_TILEK_OFFLINE", None)
    tests_dir = os.path.dirname(__file__)
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(log), tests_dir], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outputs)) == 1 and outputs[0].strip()
    assert log.read_text().count("compile") == 1
    assert not glob.glob(str(tmp_path / "cache" / "*" / "*" / ".tmp-*"))


def test_kernel_artifacts_use_offline_mode(tmp_path, monkeypatch):
    calls = []

    def factory(n):
        calls.append(n)
        raise AssertionError("offline mode must not compile")

    k = TileKernel(factory=factory, name="never_compiled")
    clear_memory_cache()
    with config.use_cache_dir(str(tmp_path)), config.offline_mode():
        with pytest.raises(KernelNotCompiledError, match=r"kernel 'never_compiled' \(n=3\) for sm_90a"):
            k.artifact({"n": 3}, "sm_90a")
    assert calls == []
