"""``python -m jax_tilek``: doctor, precompile, cache, bench, sanitize, and jax_tilek's logging (CPU)."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import pytest

import jax_tilek
from jax_tilek import cache, compiler, config, op, platform
from jax_tilek._cli import main, plots, programs, sanitize
from jax_tilek._cli.precompile import case_units, precompile_units
from jax_tilek.kernel import clear_memory_cache, record_kernels
from jax_tilek.testing import lower_for_cuda, prepare
from jax_tilek.transpose import transpose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED = os.path.join(ROOT, "benchmarks", "results")
SMOKE_SHAPE = (192, 320)  # transpose's case matrix_bfloat16_192x320 (doctor's smoke case)
TEST_CACHE = config.cache_dir()  # the tests' cache (tests/conftest.py)


def _smoke_key() -> str:
    """The cache key of the smoke kernel, lowered from the tests' cache (compiled there if missing)."""
    used = jax_tilek.precompile(transpose, jax.ShapeDtypeStruct(SMOKE_SHAPE, jnp.bfloat16), arch="sm_90a")
    (key,) = {k for *_, k in used}
    return key


@pytest.fixture
def smoke_entry() -> tuple[str, str]:
    """(path, key) of the smoke kernel's entry in the tests' cache."""
    with config.use_cache_dir(TEST_CACHE):
        key = _smoke_key()
    path = cache.find_entry(key, TEST_CACHE)
    assert path is not None
    return path, key


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> str:
    """An empty kernel cache for this test (JAX_TILEK_CACHE_DIR), in-memory kernels forgotten around it."""
    root = str(tmp_path / "cache")
    os.makedirs(root)
    monkeypatch.setenv("JAX_TILEK_CACHE_DIR", root)
    clear_memory_cache()
    yield root
    clear_memory_cache()


def _copy_entry(path: str, root: str) -> str:
    toolchain = os.path.basename(os.path.dirname(os.path.dirname(path)))
    target = os.path.join(root, toolchain, os.path.basename(os.path.dirname(path)), os.path.basename(path))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(path, target)
    return target


# ---------------------------------------------------------------------------------------------
# doctor


def test_doctor_reports_no_gpu_and_what_that_means(capsys):
    assert not jax_tilek.kernels_available()
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "WARN  gpu         no NVIDIA GPU: jax_tilek ops run their pure-JAX references" in out
    assert "OK    jax         jax " in out and "backend cpu" in out
    assert f"OK    nvcc        {compiler.nvcc_version()}" in out
    assert "lowers for sm_90a to 1 tilek_launch call" in out  # the smoke case off the GPU
    assert " 0 FAIL" in out


def test_doctor_fails_with_the_fix_and_exit_status(capsys, monkeypatch):
    monkeypatch.setattr(compiler, "TILELANG_VERSION", "0.0.1")
    assert main(["doctor", "--no-smoke"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  tilelang    jax_tilek's compiler is tested with TileLang 0.0.1" in out
    assert "fix: pip install tilelang==0.0.1" in out
    assert "1 FAIL (tilelang)" in out


def test_doctor_names_damaged_cache_entries(capsys, smoke_entry, private_cache):
    target = _copy_entry(smoke_entry[0], private_cache)
    with open(target, "r+b") as f:
        f.truncate(100)
    assert main(["doctor", "--no-smoke"]) == 0  # online a damaged entry is rebuilt: a warning
    out = capsys.readouterr().out
    assert "WARN  cache" in out and "1 entries" in out and "1 damaged" in out
    assert "fix: python -m jax_tilek cache verify" in out
    with config.offline_mode():  # offline it cannot be rebuilt: a failure
        assert main(["doctor", "--no-smoke"]) == 1


# ---------------------------------------------------------------------------------------------
# cache


def test_cache_verify_rebuilds_or_deletes_planted_corruption(capsys, smoke_entry, private_cache):
    if not (compiler.tilelang_available() and compiler.nvcc_available()):
        pytest.skip("rebuilding needs TileLang and nvcc")
    path, key = smoke_entry
    with open(path, "rb") as f:
        good = json.loads(f.read())
    target = _copy_entry(path, private_cache)
    # 1: the cubin's payload altered (its JSON still names the configuration): rebuilt.
    entry = json.loads(open(target).read())
    payload = entry["cubin_z"]
    entry["cubin_z"] = payload[:40] + ("A" if payload[40] != "A" else "B") + payload[41:]
    with open(target, "w") as f:
        json.dump(entry, f)
    # 2: garbage at another entry's address: deleted.
    garbage = os.path.join(os.path.dirname(os.path.dirname(target)), "ab", "ab" + "0" * 62 + ".json")
    os.makedirs(os.path.dirname(garbage))
    with open(garbage, "wb") as f:
        f.write(b"\x00not json")
    # 3: the leftover of an interrupted write: removed.
    stray = os.path.join(os.path.dirname(target), ".tmp-x1.json")
    open(stray, "w").close()

    assert main(["cache", "verify", "--check"]) == 1
    out = capsys.readouterr().out
    assert "2 entries, 2 damaged, 1 leftover" in out and "fix: python -m jax_tilek cache verify" in out
    assert os.path.exists(garbage) and os.path.exists(stray)  # --check changes nothing

    assert main(["cache", "verify"]) == 0
    out = capsys.readouterr().out
    assert "-> rebuilt" in out and "-> deleted (its configuration cannot be read back)" in out
    assert not os.path.exists(garbage) and not os.path.exists(stray)
    (info,) = cache.scan(private_cache)
    assert info.ok and info.path == target
    rebuilt = json.loads(open(target).read())
    # the same kernel again (nvcc's cubin bytes vary with the temporary file's path, so not the cubin)
    assert (rebuilt["build_id"], rebuilt["spec"]) == (good["build_id"], good["spec"])
    assert main(["cache", "verify", "--check"]) == 0


def test_cache_list_and_prune(capsys, smoke_entry, private_cache):
    target = _copy_entry(smoke_entry[0], private_cache)
    other = os.path.join(private_cache, "nvcc12.0.0-tilelang0.1.0", "cd", "cd" + "1" * 62 + ".json")
    os.makedirs(os.path.dirname(other))
    shutil.copy2(target, other)
    old = time.time() - 10 * 86400
    os.utime(other, (old, old))

    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "nvcc12.0.0-tilelang0.1.0" in out and "batched_transpose_kernel" in out
    assert main(["cache", "prune"]) == 2  # says what to delete
    assert main(["cache", "prune", "--older-than", "5", "--dry-run"]) == 0
    assert "would delete 1 entries" in capsys.readouterr().out and os.path.exists(other)
    assert main(["cache", "prune", "--older-than", "5"]) == 0
    assert not os.path.exists(other) and os.path.exists(target)
    assert not os.path.exists(os.path.join(private_cache, "nvcc12.0.0-tilelang0.1.0"))  # empty toolchain dir gone
    toolchain = os.path.basename(os.path.dirname(os.path.dirname(target)))
    assert main(["cache", "prune", "--toolchain", toolchain]) == 0
    assert cache.scan(private_cache) == []


def test_cache_lists_and_prunes_old_format_entries(capsys, smoke_entry, private_cache):
    target = _copy_entry(smoke_entry[0], private_cache)
    entry = json.loads(open(target).read())
    entry["cache_format"] = cache.CACHE_FORMAT - 1
    del entry["entry_sha256"]
    with open(target, "w") as f:
        json.dump(entry, f)
    (info,) = cache.scan(private_cache)
    assert info.ok and info.old_format
    assert main(["cache", "verify"]) == 0 and os.path.exists(target)  # not damaged: kept
    assert main(["cache", "prune", "--old-formats"]) == 0
    assert not os.path.exists(target)


def test_cache_export_writes_a_minimal_cache_that_runs_offline(capsys, tmp_path, smoke_entry):
    destination = tmp_path / "shipped"
    argv = ["cache", "export", str(destination), "--program", "jax_tilek.transpose:transpose", "--args", "bf16[192,320]",
            "--jobs", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "exported 1 kernel configurations" in capsys.readouterr().out
    files = [os.path.relpath(os.path.join(d, f), destination) for d, _, fs in os.walk(destination) for f in fs]
    assert files == [os.path.relpath(smoke_entry[0], TEST_CACHE)]  # that entry only, no .locks
    clear_memory_cache()
    try:
        with config.use_cache_dir(str(destination)), config.offline_mode():
            assert len(lower_for_cuda(transpose, jax.ShapeDtypeStruct(SMOKE_SHAPE, jnp.bfloat16))) > 0
    finally:
        clear_memory_cache()


# ---------------------------------------------------------------------------------------------
# precompile


def test_program_arguments_parse():
    assert programs.parse_arg("bf16[8,1024]") == jax.ShapeDtypeStruct((8, 1024), jnp.bfloat16)
    assert programs.parse_arg("float32[]") == jax.ShapeDtypeStruct((), jnp.float32)
    assert programs.parse_arg("e4m3[4, 16]") == jax.ShapeDtypeStruct((4, 16), jnp.float8_e4m3fn)
    assert programs.parse_arg("7") == 7 and programs.parse_arg("'e4m3'") == "e4m3" and programs.parse_arg("None") is None
    with pytest.raises(ValueError, match="unknown dtype"):
        programs.parse_arg("bf17[3]")
    with pytest.raises(ValueError, match="neither"):
        programs.parse_arg("x y")
    with pytest.raises(ValueError, match="module:function"):
        programs.resolve("jax_tilek.transpose")


def test_parallel_precompile_covers_exactly_the_serial_set():
    family = ["jax_tilek.transpose"]
    with record_kernels() as used:
        count = prepare("sm_90a", family)
    serial = {k for *_, k in used}
    units = case_units(family)
    assert len({u.function for u in units[:2]}) == 2  # interleaved across functions
    summary = precompile_units(units, "sm_90a", jobs=2, progress=False)
    assert not summary.failed
    assert summary.keys == serial and sum(r.programs for r in summary.results) == count
    assert summary.compiled == set()  # prepare just compiled what was missing
    assert f"{len(serial)} ({len(summary.compiled)} compiled, {len(serial)} from the cache" in summary.text()


def test_precompile_counts_compiled_and_cached_and_fails_loudly(capsys, smoke_entry, private_cache):
    _copy_entry(smoke_entry[0], private_cache)
    argv = ["precompile", "--program", "jax_tilek.transpose:transpose", "--args", "bf16[192,320]", "--jobs", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "1 units (1 programs lowered)" in captured.out and "1 (0 compiled, 1 from the cache" in captured.out
    assert "precompile sm_90a: 100%" in captured.err  # the progress bar
    bad = ["precompile", "--program", "jax_tilek.transpose:transpose", "--args", "bf16[100,64]", "--no-progress"]
    assert main(bad) == 1
    out = capsys.readouterr().out
    assert "failed: 1" in out and "jax_tilek.transpose:transpose: ValueError" in out


def test_testing_main_is_the_precompile_command(capsys):
    assert jax_tilek.testing.main(["--family", "transpose", "--jobs", "1", "--no-progress"]) == 0
    assert "failed: 0" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# bench


def test_bench_plots_a_saved_run(capsys, tmp_path):
    import matplotlib.image

    assert main(["bench", "--from-json", os.path.join(SAVED, "h100-2026-12-05.json"), "--plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3" in out and "forward_residual" in out and "98.9%" in out
    assert "no plot overhead.png" in out
    for name in ("bandwidth.png", "speedup.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.shape[0] > 1500 and image.shape[1] > 1000  # 66 labelled rows
    assert main(["bench", "--from-json", os.path.join(SAVED, "h200-2026-11-22-a.json"), "--plot", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "overhead.png").stat().st_size > 10_000


def test_bench_case_prefixes_choose_rows_and_cases(capsys):
    saved = os.path.join(SAVED, "h100-2026-12-06-b.json")
    assert main(["bench", "--from-json", saved, "--case", "expand_to_fused/,reduce_fused/"]) == 0
    out = capsys.readouterr().out
    assert "expand_to_fused/bfloat16_4096x7168" in out and "reduce_fused/bfloat16_16384x7168" in out
    assert "expand_to_fused_with_sf" not in out and "topk_gate" not in out and "engram" not in out
    from benchmarks import run as bench_run

    names = [c.name for c in bench_run.chosen({"moe"}, ("expand_to_fused/",))]
    assert names and all(n.startswith("expand_to_fused/") for n in names)
    assert len(bench_run.chosen({"moe"})) > len(names)


def test_bench_plots_leave_out_compute_bound_families(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    gemm = {"family": "gemm", "case": "g", "frac_of_copy": 0.1, "gbps": 1.0, "copy_gbps": 10.0, "time_us": 5.0,
            "speedup_vs_xla": 0.9, "xla_time_us": 4.5}  # fmt: skip
    assert plots.plot_bandwidth({"device": "d", "results": [gemm]}, str(tmp_path / "b.png")) is None
    assert plots.plot_speedup({"device": "d", "results": [gemm]}, str(tmp_path / "s.png")) is not None
    rows = plots._ordered([dict(gemm, family="t", case=c, frac_of_copy=f) for c, f in (("a", 0.2), ("b", 0.9))], "frac_of_copy")
    assert [r["case"] for r in rows] == ["b", "a"]


def test_bench_needs_a_gpu_or_a_checkout(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    assert main(["bench", "--family", "transpose"]) == 2
    assert "need a Hopper/Blackwell GPU" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no benchmarks/ here"):
        main(["bench"])


# ---------------------------------------------------------------------------------------------
# sanitize

LOG = """\
========= COMPUTE-SANITIZER
========= Invalid __global__ write of size 2 bytes
=========     at batched_transpose_kernel+0x1b0 in /tmp/kernel.cu:40
=========     by thread (3,0,0) in block (7,0,0)
=========     Address 0x7f00 is out of bounds
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: cuLaunchKernelEx [0x2b3] in libcuda.so.1
=========
========= Invalid __global__ read of size 4 bytes
=========     at norm_backward_kernel_1(float *)+0x40 in kernel.cu:9
=========
========= Program hit cudaErrorLaunchFailure (error 719) on CUDA API call to cuStreamSynchronize.
=========
========= ERROR SUMMARY: 2 errors
"""


def test_sanitizer_log_is_split_and_attributed_by_entry():
    log = sanitize.parse_log(LOG)
    assert log.summary_errors == 2 and len(log.records) == 2
    assert "by thread (3,0,0)" in log.records[0]
    kernels = {
        "jax_tilek.transpose._batched_transpose.batched_transpose_kernel": {"entries": ["batched_transpose_kernel"]},
        "jax_tilek.norm._kernels.norm_backward_kernel": {"entries": ["norm_backward_kernel"]},  # not "..._1"
    }
    by = sanitize.attribute(log.records, kernels)
    assert len(by["jax_tilek.transpose._batched_transpose.batched_transpose_kernel"]) == 1
    assert by["jax_tilek.norm._kernels.norm_backward_kernel"] == [] and len(by[""]) == 1


def test_manifest_names_the_kernels_and_entries_a_program_used():
    with record_kernels() as used, config.fresh_lowering():
        lower_for_cuda(transpose, jax.ShapeDtypeStruct(SMOKE_SHAPE, jnp.bfloat16))
    ((name, item),) = sanitize.kernels_of(used).items()
    assert name.endswith("batched_transpose_kernel") and item["entries"] == {"batched_transpose_kernel"}


FAKE_SANITIZER = """\
#!{python}
import json, os, sys
args = sys.argv[1:]
tool, log = args[args.index("--tool") + 1], args[args.index("--log-file") + 1]
assert args[args.index("--target-processes") + 1] == "all"
target = args[args.index(log) + 1:]
env_ok = os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR") == "platform"
with open(log, "w") as f:
    if tool == "memcheck":
        f.write("========= Invalid __global__ write of size 2 bytes\\n=========     at batched_transpose_kernel+0x10 in k.cu:1\\n")
        f.write("========= ERROR SUMMARY: 1 error\\n")
    else:
        f.write("========= ERROR SUMMARY: 0 errors\\n")
manifest = {{"kernels": {{"jax_tilek.transpose._batched_transpose.batched_transpose_kernel":
             {{"entries": ["batched_transpose_kernel"], "configs": ["k1", "k2"], "users": ["transpose.transpose/x"]}}}},
            "failures": [] if env_ok else ["allocator not platform"], "ran": [" ".join(target)]}}
json.dump(manifest, open(os.environ["{env}"], "w"))
"""


def test_sanitize_runs_each_tool_and_prints_a_line_per_kernel(capsys, tmp_path):
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER.format(python=sys.executable, env=sanitize.MANIFEST_ENV))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    argv = ["sanitize", "--tool", "memcheck,racecheck", "--op", "transpose.transpose", "--sanitizer", str(fake), "--out", str(tmp_path / "logs")]
    assert main(argv) == 1
    out = capsys.readouterr().out.splitlines()
    kernel = "jax_tilek.transpose._batched_transpose.batched_transpose_kernel  [batched_transpose_kernel; 2 configs]"
    assert f"memcheck  FAIL  {kernel}: 1 errors: Invalid __global__ write of size 2 bytes" in out
    assert f"racecheck ok    {kernel}: 0 errors" in out
    assert any(line.startswith("racecheck ok    total: 1 kernels, 1 tests/cases, 0 errors") for line in out)
    manifest = json.load(open(tmp_path / "logs" / "memcheck.manifest.json"))
    assert manifest["ran"] == [f"{sys.executable} -m jax_tilek._cli.sanitize_child --op transpose.transpose"]
    assert main(["sanitize", "--tool", "leakcheck"]) == 2


def test_sanitize_runs_tools_in_parallel_with_a_bounded_case_count(capsys, tmp_path):
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER.format(python=sys.executable, env=sanitize.MANIFEST_ENV))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    argv = ["sanitize", "--parallel", "--cases-per-op", "2", "--family", "transpose", "--sanitizer", str(fake), "--out", str(tmp_path / "logs")]
    assert main(argv) == 1  # the fake's memcheck reports an error
    out = capsys.readouterr().out.splitlines()
    totals = [line.split()[0] for line in out if "total:" in line]
    assert totals == list(sanitize.TOOLS)  # every tool ran, reported in the given order
    manifest = json.load(open(tmp_path / "logs" / "synccheck.manifest.json"))
    assert manifest["ran"] == [f"{sys.executable} -m jax_tilek._cli.sanitize_child --family transpose --cases-per-op 2"]


def test_sanitize_runs_each_family_and_op_in_a_process_of_its_own(capsys, tmp_path):
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER.format(python=sys.executable, env=sanitize.MANIFEST_ENV))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    argv = ["sanitize", "--tool", "racecheck", "--family", "transpose", "--op", "rope.apply_rotary", "--sanitizer", str(fake), "--out", str(tmp_path)]
    assert main(argv) == 0
    totals = [line for line in capsys.readouterr().out.splitlines() if "total:" in line]
    assert len(totals) == 2 and "racecheck.transpose.log" in totals[0] and "racecheck.rope.apply_rotary.log" in totals[1]
    for name, flag in (("transpose", "--family"), ("rope.apply_rotary", "--op")):
        manifest = json.load(open(tmp_path / f"racecheck.{name}.manifest.json"))
        assert manifest["ran"] == [f"{sys.executable} -m jax_tilek._cli.sanitize_child {flag} {name}"]


def test_sanitize_stops_a_run_at_its_time_limit_and_says_so(capsys, tmp_path):
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    start = time.monotonic()
    assert main(["sanitize", "--tool", "memcheck", "--time-limit", "1", "--op", "transpose.transpose", "--sanitizer", str(fake), "--out", str(tmp_path)]) == 1
    assert time.monotonic() - start < 30
    out = capsys.readouterr().out
    assert "memcheck  FAIL  the run did not finish cleanly (exit stopped after 1 s)" in out


def test_sanitize_plugin_records_each_tests_kernels(tmp_path):
    test = tmp_path / "test_lowers.py"
    test.write_text(textwrap.dedent("""
        import jax, jax.numpy as jnp
        from jax_tilek.testing import lower_for_cuda
        from jax_tilek.transpose import transpose

        def test_lower():
            lower_for_cuda(transpose, jax.ShapeDtypeStruct((192, 320), jnp.bfloat16))

        def test_fails():
            assert False
    """))
    manifest = tmp_path / "manifest.json"
    env = dict(os.environ, **{sanitize.MANIFEST_ENV: str(manifest)})
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "jax_tilek._cli.sanitize_plugin",
                           "--rootdir", str(tmp_path), str(test)], cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    data = json.load(open(manifest))
    (item,) = data["kernels"].values()
    assert item["entries"] == ["batched_transpose_kernel"] and item["users"] == ["test_lowers.py::test_lower"]
    assert data["failures"] == ["test_lowers.py::test_fails (call) failed"]


# ---------------------------------------------------------------------------------------------
# logging


def test_each_op_says_once_per_platform_which_implementation_it_took(caplog):
    op._tell.cache_clear()
    x = jnp.ones(SMOKE_SHAPE, jnp.bfloat16)
    with caplog.at_level(logging.INFO, logger="jax_tilek"):
        jax.jit(lambda x: transpose(x) + 1)(x)
        jax.jit(lambda x: transpose(x) * 2)(x)
        with config.fresh_lowering():
            lower_for_cuda(transpose, jax.ShapeDtypeStruct(SMOKE_SHAPE, jnp.bfloat16))
        transpose(x, impl="xla")
    messages = [r.getMessage() for r in caplog.records if r.name == "jax_tilek.op"]
    name = next(m.split(" on ")[0] for m in messages)
    assert messages.count(f"{name} on cpu: the reference (lowered for cpu: kernels run only on CUDA)") == 1
    assert f"{name} on cuda: the TileLang kernel for sm_90a (set by JAX_TILEK_ARCH or target_arch())" in messages
    assert f"{name} on any platform: the reference (impl='xla')" in messages


def test_unsupported_gpu_warns_once(caplog, monkeypatch):
    class Ampere:
        device_kind, compute_capability, platform = "NVIDIA A100", "8.0", "gpu"

    monkeypatch.setattr(jax, "devices", lambda backend=None: [Ampere()])
    platform._local_gpu_arch.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="jax_tilek"):
            assert platform._local_gpu_arch() == (True, None)
            assert platform._local_gpu_arch() == (True, None)
    finally:
        platform._local_gpu_arch.cache_clear()
    (record,) = [r for r in caplog.records if r.name == "jax_tilek.platform"]
    assert record.levelno == logging.WARNING and "NVIDIA A100 (compute capability 8.0)" in record.getMessage()
    assert "pure-JAX references" in record.getMessage()


def test_cache_events_are_logged_with_timings(caplog, smoke_entry):
    clear_memory_cache()
    with caplog.at_level(logging.DEBUG, logger="jax_tilek"), cache.record_events() as events, config.fresh_lowering():
        lower_for_cuda(transpose, jax.ShapeDtypeStruct(SMOKE_SHAPE, jnp.bfloat16))
    assert [(e.kind, e.key) for e in events] == [("hit", smoke_entry[1])]
    (record,) = [r for r in caplog.records if r.name == "jax_tilek.cache"]
    assert record.levelno == logging.DEBUG and record.getMessage().startswith("cache hit: kernel 'jax_tilek.transpose.")
    assert f"({smoke_entry[0]})" in record.getMessage()


def test_nothing_is_printed_by_default():
    code = ("import jax, jax.numpy as jnp; from jax_tilek.transpose import transpose; "
            "print(jax.jit(transpose)(jnp.ones((64, 128), jnp.bfloat16)).shape)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "(128, 64)\n" and done.stderr == ""
    loud = subprocess.run([sys.executable, "-m", "jax_tilek", "-v", "doctor", "--no-smoke"], capture_output=True, text=True, cwd=ROOT)
    assert loud.returncode == 0 and "OK    jax" in loud.stdout


def test_sanitizer_env_turns_autotuning_off_and_keeps_other_flags(monkeypatch):
    from jax_tilek._cli import sanitize

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    env = sanitize.sanitizer_env("/tmp/m.json")
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", "--xla_gpu_autotune_level=0"]
    assert env["XLA_PYTHON_CLIENT_ALLOCATOR"] == "platform"


def test_bench_harness_sizes_rotation_by_memory_and_reports_failed_cases(monkeypatch, capsys):
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import harness

    mib = 2**20
    assert harness.set_count(64 * mib, 64 * mib, 80 * 2**30) == harness.MIN_CALLS  # small: MIN_CALLS sets
    assert harness.set_count(mib, mib, 80 * 2**30) == 64  # tiny: enough to rotate past L2, at most 64
    assert harness.set_count(2**30, 12 * 2**30, 36 * 2**30) == 2  # temporaries of GiBs: what fits
    assert harness.set_count(2**30, 40 * 2**30, 36 * 2**30) == 1
    # XLA:CPU gives a compiled program's temporaries and outputs.
    x = jax.numpy.ones((1024, 256), jax.numpy.float32)
    assert harness._call_bytes(lambda a: (a @ a.T).sum(0), (x,)) >= 1024 * 4

    def boom(key):
        raise MemoryError("RESOURCE_EXHAUSTED: out of memory\nmore lines")

    cases = [harness.Case("demo", "fails", boom, lambda x: x, None, 4, {"shape": "1"}),
             harness.Case("demo", "runs", lambda key: (jax.random.normal(key, (256,)),), lambda x: x * 2, lambda x: x + x, 1024, {"shape": "256"})]
    monkeypatch.setattr(harness, "copy_gbps", lambda: 1.0)  # the real one copies GiBs: minutes on a CPU
    monkeypatch.setattr(harness, "REPEATS", 2)
    results = harness.run(cases)
    assert results[0]["error"] == "MemoryError: RESOURCE_EXHAUSTED: out of memory" and "time_us" not in results[0]
    assert results[1]["time_us"] > 0 and "error" not in results[1]
    from jax_tilek._cli.report import bench_report

    report = bench_report("cpu", results, [])
    assert "not measured: demo/fails: MemoryError" in report and "runs" in report


def test_kernel_times_groups_ncu_rows_by_kernel_name():
    from benchmarks.kernel_times import kernel_table

    header = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"'
    rows = ['"0","expand_to_fused_kernel(unsigned int *)","gpu__time_duration.sum","ns","1,500"',
            '"1","loop_fusion_3","gpu__time_duration.sum","ns","250"',
            '"2","expand_to_fused_kernel(unsigned int *)","gpu__time_duration.sum","ns","500"',
            '"3","loop_fusion_3","dram__bytes.sum","byte","99999"']  # fmt: skip
    text = "\n".join(["==PROF== Connected to process 1", header, *rows, "program output"])
    assert kernel_table(text) == [("expand_to_fused_kernel", 2, 2.0), ("loop_fusion_3", 1, 0.25)]


def test_step_profile_groups_kernels_and_shows_what_a_variant_adds(tmp_path):
    from benchmarks import step_profile

    assert step_profile.group("loop_fusion_12") == step_profile.group("loop_fusion_7") == "loop_fusion"
    assert step_profile.group("fusion.3.1") == "fusion" and step_profile.group("mhc_post_kernel") == "mhc_post_kernel"
    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((128, 128))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path / "trace")):
        f(x).block_until_ready()
    # A CPU trace has no GPU plane: its XLA CPU client's threads stand in for the streams.
    with pytest.raises(ValueError, match="no plane"):
        step_profile.kernel_times(str(tmp_path / "trace"))
    times = step_profile.kernel_times(str(tmp_path / "trace"), plane="/host:CPU", line="tf_XLA")
    assert times and all(ns >= 0 for ns in times.values())
    variant = times.copy()
    variant["mhc_post_kernel"] += 3_000_000
    rows = step_profile.table(variant, times, steps=3, top=5)
    assert "mhc_post_kernel" in rows[1] and rows[1].split()[-1] == "+1000.0"
    assert rows[-1].startswith("total device time") and "+1000.0" in rows[-1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        step_profile.kernel_times(str(tmp_path / "empty"))


def test_residual_bwd_variants_launch_their_tiling_and_match_the_reference_shape():
    import numpy as np

    from benchmarks import bench_mhc
    from jax_tilek.kernel import record_kernels
    from jax_tilek.testing import tilek_calls

    cases = bench_mhc.residual_bwd_variants(shapes=((16, 64),))
    assert len(cases) == len(bench_mhc.RESIDUAL_BWD_TILINGS)
    for case, (step, tokens, ctas) in zip(cases, bench_mhc.RESIDUAL_BWD_TILINGS):
        inputs = case.make_inputs(jax.random.key(0))
        with record_kernels() as used:
            text = lower_for_cuda(case.kernel, *inputs)
        assert len(tilek_calls(text)) == 1
        params = [p for name, p, *_ in used if name.endswith("residual_grad_kernel")]
        assert params and all((p["tokens_per_thread"], p["tokens_per_cta"], p["ctas_per_sm"]) == (step, tokens, ctas) for p in params)
        want = jax.eval_shape(case.xla, *inputs)
        assert (want.shape, want.dtype) == ((16, 4, 64), np.dtype("bfloat16"))
    from jax_tilek.mhc import _residual_grad

    bad = _residual_grad.residual_grad_op.with_config(tokens_per_thread=3)
    with pytest.raises(ValueError, match="multiple of 4 x tokens_per_thread"):
        lower_for_cuda(functools.partial(bad, impl="tilelang"), *cases[0].make_inputs(jax.random.key(0)))
