"""TileLang -> cubin + launch spec, on this GPU-less machine."""

import pytest

pytest.importorskip("tilelang")

from jax_tilek import compiler  # noqa: E402
from jax_tilek.compiler import CompileError, compile_prim_func  # noqa: E402

import byo_kernels  # noqa: E402

ELF_MAGIC = b"\x7fELF"


def _arg_kinds(kernel):
    return [(a.kind, a.ref or a.value) for a in kernel.args]


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
def test_elementwise_kernel(arch):
    art = compile_prim_func(byo_kernels.scale_rows(n_cols=256, dtype="bfloat16"), arch, name="scale_rows")
    assert art.cubin.startswith(ELF_MAGIC)
    spec = art.spec
    assert [p.name for p in spec.params] == ["x", "s", "y"]
    assert spec.params[0].shape == ("M", 256)
    (k,) = spec.kernels
    # Parameter order comes from the lowered device function, not from the Python signature.
    assert _arg_kinds(k) == [("buffer", "s"), ("buffer", "x"), ("buffer", "y"), ("scalar", "M")]
    assert k.grid == (["floordiv", ["add", "M", 3], 4], 1, 1)
    assert k.block == (128, 1, 1) and k.smem == 0 and k.cluster == (1, 1, 1)


def test_warp_specialized_tma_gemm():
    art = compile_prim_func(byo_kernels.gemm(n=512, k=1024), "sm_90a", name="gemm")
    (k,) = art.spec.kernels
    assert k.block == (384, 1, 1)  # 256 consumer threads + a producer warpgroup
    assert k.smem > 48 * 1024  # needs the dynamic shared-memory opt-in
    assert _arg_kinds(k) == [("tma", "A_desc"), ("tma", "B_desc"), ("buffer", "C"), ("scalar", "m")]
    a_desc = next(t for t in art.spec.tma if t.name == "A_desc")
    assert a_desc.tensor == "A" and a_desc.dims == (1024, "m") and a_desc.strides == (2048,)
    assert a_desc.box == (64, 128) and a_desc.swizzle == 3  # 128-byte swizzle
    assert "wgmma" in art.source and "tma_load" in art.source


def test_two_device_kernels_and_scalars():
    art = compile_prim_func(byo_kernels.axpy_then_square(n=256), "sm_90a", name="two")
    k0, k1 = art.spec.kernels
    assert (k0.entry, k1.entry) == ("main_kernel", "main_kernel_1")
    assert _arg_kinds(k0) == [("buffer", "x"), ("buffer", "y"), ("scalar", "alpha"), ("scalar", "m"), ("scalar", "s")]
    assert art.spec.params[0].strides == ("s", 1)
    assert [p.name for p in art.spec.scalar_params] == ["alpha"]


def test_pdl_and_cluster_flags():
    import tilelang.language as T

    M = T.dynamic("m")

    @T.prim_func
    def pdl(x: T.Tensor((M, 128), "float32"), y: T.Tensor((M, 128), "float32")):
        with T.Kernel(M, threads=128) as bx:
            T.pdl_sync()
            for j in T.Parallel(128):
                y[bx, j] = x[bx, j] * 2.0

    @T.prim_func
    def clustered(x: T.Tensor((M, 128), "float32"), y: T.Tensor((M, 128), "float32")):
        with T.Kernel(M, threads=128, cluster_dims=(2, 1, 1)) as bx:
            for j in T.Parallel(128):
                y[bx, j] = x[bx, j] * 2.0

    (k,) = compile_prim_func(pdl, "sm_90a").spec.kernels
    assert k.pdl and k.cluster == (1, 1, 1)
    (k,) = compile_prim_func(clustered, "sm_90a").spec.kernels
    assert not k.pdl and k.cluster == (2, 1, 1)


def test_errors_name_the_problem():
    with pytest.raises(CompileError, match="unsupported architecture 'sm_80'"):
        compile_prim_func(byo_kernels.scale_rows(n_cols=64, dtype="float32"), "sm_80")
    with pytest.raises(CompileError, match="must return a TileLang prim_func"):
        compile_prim_func(lambda: None, "sm_90a")


def test_toolchain_is_pinned():
    tc = compiler.toolchain()
    assert tc["tilelang"] == compiler.TILELANG_VERSION
    assert tc["nvcc"].count(".") == 2


# ---------------------------------------------------------------------------------------------
# Which nvcc.


def _fake_nvcc(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    path.chmod(0o755)
    return str(path)


def _fake_wheel(site):
    """An installed nvidia-cuda-nvcc wheel: its dist-info and nvidia/cu13/bin/nvcc."""
    nvcc = _fake_nvcc(site / "nvidia" / "cu13" / "bin" / "nvcc")
    info = site / "nvidia_cuda_nvcc-13.0.88.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nvidia-cuda-nvcc\nVersion: 13.0.88\n")
    (info / "RECORD").write_text("nvidia/cu13/bin/nvcc,,\nnvidia_cuda_nvcc-13.0.88.dist-info/METADATA,,\n")
    return nvcc


@pytest.fixture
def no_system_nvcc(monkeypatch, tmp_path):
    for name in ("JAX_TILEK_NVCC", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(compiler, "_SYSTEM_CUDA_HOMES", ())
    compiler.nvcc_path.cache_clear()
    yield
    compiler.nvcc_path.cache_clear()


def test_nvcc_from_the_wheel_when_no_system_nvcc(no_system_nvcc, monkeypatch, tmp_path):
    nvcc = _fake_wheel(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert compiler.wheel_nvcc() == nvcc
    assert compiler.nvcc_path() == nvcc


def test_a_system_nvcc_wins_over_the_wheel(no_system_nvcc, monkeypatch, tmp_path):
    _fake_wheel(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    system = _fake_nvcc(tmp_path / "cuda" / "bin" / "nvcc")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert compiler.nvcc_path() == system
    compiler.nvcc_path.cache_clear()
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path / "cuda" / "bin"))
    assert compiler.nvcc_path() == system
    compiler.nvcc_path.cache_clear()
    explicit = _fake_nvcc(tmp_path / "mine" / "nvcc")
    monkeypatch.setenv("JAX_TILEK_NVCC", explicit)
    assert compiler.nvcc_path() == explicit


def test_no_nvcc_at_all_says_how_to_get_one(no_system_nvcc, monkeypatch):
    monkeypatch.setattr(compiler, "wheel_nvcc", lambda: None)
    with pytest.raises(compiler.NvccNotFoundError, match=r"install jax_tilek\[compile\]"):
        compiler.nvcc_path()
    assert not compiler.nvcc_available()
