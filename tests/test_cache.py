"""The kernel cache: addressing, atomic entries, checksums, offline mode, concurrent compiles."""

import glob
import json
import os
import subprocess
import sys
import re
import textwrap

import pytest

from jax_tilek import cache, config
from jax_tilek.cache import CacheError, KernelNotCompiledError
from jax_tilek.compiler import Artifact
from jax_tilek.kernel import TileKernel, canonical_param, clear_memory_cache, kernel
from jax_tilek.spec import DeviceKernel, KernelArg, LaunchSpec, TensorParam

from conftest import require_nvcc

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


def test_key_fills_the_factorys_defaults():
    """A configuration spelled with or without its default parameters is one cache entry."""
    import byo_kernels

    k = byo_kernels.gemm
    short = k.cache_fields(dict(n=256, k=128), "sm_90a")
    assert short == k.cache_fields(dict(n=256, k=128, block_m=128, stages=3), "sm_90a")
    assert short["params"]["block_k"] == 64
    assert cache.entry_key(short) != cache.entry_key(k.cache_fields(dict(n=256, k=128, stages=4), "sm_90a"))


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

    real = compiler.lower_prim_func  # the first step of compiling a kernel (then nvcc)
    def logged(*args, **kwargs):
        with open(sys.argv[1], "a") as f:
            f.write("compile\\n")
        time.sleep(1.0)  # widen the window in which the other processes miss
        return real(*args, **kwargs)
    compiler.lower_prim_func = logged
    art = byo_kernels.scale_rows.artifact({"n_cols": 128, "dtype": "float32", "block_m": 2}, "sm_90a")
    print(art.cubin.hex()[:64], len(art.cubin))
    """
)


def test_processes_compiling_the_same_kernel_at_once(tmp_path):
    pytest.importorskip("tilelang")
    require_nvcc()
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


# ---------------------------------------------------------------------------------------------
# What a kernel's identity covers.


def _write_package(root, name, files):
    pkg = root / name
    pkg.mkdir()
    for file, text in files.items():
        (pkg / file).write_text(textwrap.dedent(text))
    return pkg


def test_source_digest_follows_transitive_imports(tmp_path, monkeypatch):
    import importlib
    import uuid

    name = f"user_pkg_{uuid.uuid4().hex[:8]}"
    pkg = _write_package(tmp_path, name, {
        "__init__.py": f"from {name}.formats import SCALE\nfrom {name} import unrelated\n",
        "kern.py": f"import importlib\nimport numpy as np\nfrom {name} import SCALE\nfrom {name}.helpers import macro\n"
                   f"_late = importlib.import_module('{name}.late')\n\ndef factory(n):\n    return macro(n) * SCALE\n",
        "helpers.py": "from . import formats\n\ndef macro(n):\n    return formats.WIDTH * n\n",
        "formats.py": "SCALE = 2\nWIDTH = 4\n",
        "late.py": "LATE = 1\n",
        "unrelated.py": "X = 1\n",
    })  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module(f"{name}.kern")
    assert kernel(mod.factory).dependencies() == [f"{name}.formats", f"{name}.helpers", f"{name}.late"]

    def digest():
        return kernel(mod.factory).source_digest

    first = digest()
    for file in ("helpers.py", "formats.py", "late.py", "kern.py"):  # each edit changes the key
        (pkg / file).write_text((pkg / file).read_text() + "# edited\n")
        assert digest() != first, file
        first = digest()
    (pkg / "unrelated.py").write_text("X = 2  # not used by the kernel\n")
    assert digest() == first


def test_source_digest_covers_shared_jax_tilek_modules(monkeypatch):
    import inspect

    from jax_tilek.quant import formats
    from jax_tilek.norm import norm_forward_kernel

    before = TileKernel(factory=norm_forward_kernel.factory, name="n").source_digest
    real = inspect.getsource

    def edited(obj):
        text = real(obj)
        return text + "\n# edited\n" if obj is formats else text

    monkeypatch.setattr(inspect, "getsource", edited)  # an edit of quant/formats.py, which the norm kernels import
    assert TileKernel(factory=norm_forward_kernel.factory, name="n").source_digest != before


def test_source_digest_covers_the_device_library(monkeypatch):
    import inspect

    from jax_tilek import device
    from jax_tilek.transpose import batched_transpose_kernel

    kernel_ = TileKernel(factory=batched_transpose_kernel.factory, name="t")
    assert "jax_tilek.device" in kernel_.dependencies()  # a top-level module, followed: it generates kernel code
    assert not {"jax_tilek.op", "jax_tilek.kernel", "jax_tilek.spec"} & set(kernel_.dependencies())
    before = kernel_.source_digest
    real = inspect.getsource
    assert "st.global{cache}.v4.u32" in real(device)

    def edited(obj):
        text = real(obj)
        return text.replace("st.global{cache}.v4.u32", "st.global{cache}.v4.b32") if obj is device else text

    monkeypatch.setattr(inspect, "getsource", edited)  # an edit of a snippet of device.py, which the kernel's module imports
    assert TileKernel(factory=batched_transpose_kernel.factory, name="t").source_digest != before


def test_depends_is_still_accepted(tmp_path):
    import importlib

    extra = importlib.import_module("jax_tilek.quant." + "_e5m6")  # not an import this module's source shows
    plain = kernel(_artifact)
    assert "jax_tilek.quant._e5m6" not in plain.dependencies()
    assert kernel(_artifact, depends=(extra,)).source_digest != plain.source_digest
    assert "jax_tilek.quant._e5m6" in kernel(_artifact, depends=(extra,)).dependencies()


# ---------------------------------------------------------------------------------------------
# Damaged entries, unwritable caches, stuck locks.

NAMED = r"kernel 'k' \(n=1\) for sm_90a"


def _entry(tmp_path):
    cache.get_or_compile(FIELDS, TOOLCHAIN, lambda: _artifact(b"1"), root=str(tmp_path))
    (path,) = glob.glob(str(tmp_path / "*" / "*" / "*.json"))
    return path


def _damaged_versions(data: bytes):
    import random

    rng = random.Random(6)
    for bit in rng.sample(range(len(data) * 8), 160):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        yield f"bit {bit}", bytes(flipped)
    entry = json.loads(data)
    for field in entry:
        yield f"without {field}", json.dumps({k: v for k, v in entry.items() if k != field}).encode()
        yield f"{field} null", json.dumps({**entry, field: None}).encode()
    yield "empty", b""
    yield "truncated", data[:-1]


def test_every_damaged_entry_is_rebuilt_online_and_named_offline(tmp_path):
    path = _entry(tmp_path)
    original = open(path, "rb").read()
    for what, data in _damaged_versions(original):
        with open(path, "wb") as f:
            f.write(data)
        with pytest.raises(CacheError, match=NAMED):
            cache.lookup_offline(FIELDS, root=str(tmp_path))
        with pytest.warns(UserWarning, match="rebuilding corrupted"):
            rebuilt = cache.get_or_compile(FIELDS, TOOLCHAIN, lambda: _artifact(b"3"), root=str(tmp_path))
        assert rebuilt.cubin == _artifact(b"3").cubin, what
        assert cache.lookup_offline(FIELDS, root=str(tmp_path)).source == "// cuda", what


def test_a_directory_in_place_of_an_entry(tmp_path):
    path = _entry(tmp_path)
    os.unlink(path)
    os.makedirs(os.path.join(path, "junk"))
    with pytest.raises(CacheError, match=NAMED):
        cache.lookup_offline(FIELDS, root=str(tmp_path))
    with pytest.warns(UserWarning, match="rebuilding corrupted"):
        assert cache.get_or_compile(FIELDS, TOOLCHAIN, lambda: _artifact(b"3"), root=str(tmp_path)).cubin == _artifact(b"3").cubin
    assert os.path.isfile(path)


def test_unwritable_cache_names_the_kernel(tmp_path, monkeypatch):
    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # as a read-only directory does (root ignores chmod)
    with pytest.raises(CacheError, match=NAMED + ".*writable"):
        cache.get_or_compile(FIELDS, TOOLCHAIN, lambda: _artifact(), root=str(tmp_path))
    monkeypatch.setattr(os, "makedirs", refuse)
    with pytest.raises(CacheError, match=NAMED + ".*writable"):
        cache.get_or_compile(FIELDS, TOOLCHAIN, lambda: _artifact(), root=str(tmp_path / "new"))


def test_no_lock_files_are_left_in_the_cache(tmp_path):
    _entry(tmp_path)
    cache.get_or_compile({**FIELDS, "params": {"n": 2}}, TOOLCHAIN, lambda: _artifact(), root=str(tmp_path))
    left = [os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs if not f.endswith(".json")]
    assert left == []


_HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    # Holds the lock of the entry, wherever the cache keeps it, then stops.
    for path in sys.argv[1:]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_a_stopped_lock_holder_is_a_timeout_naming_the_kernel(tmp_path, monkeypatch):
    import signal
    import threading

    key = cache.entry_key(FIELDS)
    entry = os.path.join(tmp_path, cache.toolchain_id(TOOLCHAIN), key[:2], key + ".json")
    locks = [os.path.join(tmp_path, ".locks", key + ".lock"), entry + ".lock"]
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, *locks], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.send_signal(signal.SIGSTOP)
        monkeypatch.setenv("JAX_TILEK_LOCK_TIMEOUT", "1")
        outcome = []

        def compile_while_locked():
            try:
                outcome.append(cache.get_or_compile(FIELDS, TOOLCHAIN, lambda: _artifact(), root=str(tmp_path)))
            except Exception as e:
                outcome.append(e)

        waiter = threading.Thread(target=compile_while_locked, daemon=True)
        waiter.start()
        waiter.join(timeout=30)
        assert outcome, "still waiting for a stopped process's lock"
        assert isinstance(outcome[0], CacheError), outcome
        assert re.search(NAMED, str(outcome[0])) and locks[0] in str(outcome[0]) and "JAX_TILEK_LOCK_TIMEOUT" in str(outcome[0])
    finally:
        holder.kill()
        holder.wait()
    # Its lock died with it.
    assert cache.get_or_compile(FIELDS, TOOLCHAIN, lambda: _artifact(b"5"), root=str(tmp_path)).cubin == _artifact(b"5").cubin


# ---------------------------------------------------------------------------------------------
# Reusing a cubin when a re-keyed kernel generates the same CUDA source.


def test_a_rekeyed_kernel_with_the_same_source_reuses_its_cubin(tmp_path):
    cache.get_or_compile(FIELDS, TOOLCHAIN, lambda: _artifact(b"1"), root=str(tmp_path))
    rekeyed = {**FIELDS, "source": "an edited helper module"}
    assert cache.find_cubin(rekeyed, TOOLCHAIN, "// cuda", root=str(tmp_path)) == _artifact(b"1").cubin
    assert cache.find_cubin(rekeyed, TOOLCHAIN, "// other cuda", root=str(tmp_path)) is None
    assert cache.find_cubin({**rekeyed, "arch": "sm_100a"}, TOOLCHAIN, "// cuda", root=str(tmp_path)) is None
    assert cache.find_cubin(rekeyed, {**TOOLCHAIN, "nvcc": "13.1.0"}, "// cuda", root=str(tmp_path)) is None
