"""The op contract as one test base, and the named cases (``ARG_SPECS``) that tests, benchmarks and
the kernel-cache preparation share.

An op module declares its cases next to the op and hands them to its public function::

   ARG_SPECS = (
       ArgSpec("tokens_4096", (jax.ShapeDtypeStruct((4096, 7168), jnp.bfloat16),), dict(fmt="e4m3"), bench=True),
       ...
   )

   @uses(_op, cases=ARG_SPECS)
   def per_token_cast(x, fmt, *, impl=None, ops): ...

and its test file subclasses :class:`OpContract`::

   class TestPerTokenCast(OpContract):
       fn = quant.per_token_cast
       rows = True

Every case then gets the contract's tests: abstract eval against the reference, the default path
off the GPU equal to the reference, the declared number of ``tilek_launch`` calls when lowered for
"cuda" (kernels compiled for sm_90a), ``impl="tilelang"`` refused off the GPU, vmap against a loop
(one launch per call for row-wise ops), gradients against ``jax.grad`` of the reference
(``differentiable``), the token axis sharded over 8 host devices without collectives (``rows``), a
``jax_tilek.export`` round trip, and, on a GPU, the kernel against the reference (bit-exact unless
the case states a tolerance). ``bad_inputs`` lists calls that must fail at trace time.

``python -m jax_tilek.testing --arch sm_90a`` compiles every kernel every case of every family uses
into the cache, so that a GPU machine without TileLang can run the tests and benchmarks.

Tests need pytest; importing this module does not. :func:`pytest_generate_tests` parametrizes the
``case`` argument (tests/conftest.py re-exports it).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jax_tilek

FAMILIES = ("jax_tilek.transpose", "jax_tilek.quant", "jax_tilek.swiglu", "jax_tilek.norm", "jax_tilek.moe", "jax_tilek.gemm", "jax_tilek.mhc", "jax_tilek.engram", "jax_tilek.rope")  # public faces whose functions carry ``cases``

_CUBIN = re.compile(r'cubin = "(?:[^"\\]|\\.)*"')


@dataclasses.dataclass(frozen=True)
class ArgSpec:
    """A named call of an op.

    Attributes:
        name: the case's name (test ids, benchmark rows).
        args: the positional arguments: ``jax.ShapeDtypeStruct`` pytrees (filled with fresh random
          values, or by ``make``) and plain Python values passed as they are (None included).
        kwargs: keyword arguments (static options).
        make: ``(rng, *args) -> args``: concrete arguments with valid values, when random ones are not
          (indices, scales, seeds ...); it receives ``args`` with the structs.
        config: ``with_config`` fields the case sets (a kernel configuration to cover).
        tolerance: None for bit-exact GPU results, else the ``rtol`` (= ``atol``) against the reference.
        launches: ``tilek_launch`` calls the call lowers to.
        bench: a benchmark size: the benchmarks time it; the contract only traces and lowers it (no
          arrays are made), and tests that run it on the GPU pick it by name.
    """

    name: str
    args: tuple
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    make: Callable[..., tuple] | None = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tolerance: float | None = None
    launches: int = 1
    bench: bool = False

    def arrays(self, rng: np.random.Generator) -> tuple:
        """Concrete arguments with fresh random values."""
        if self.make is not None:
            return tuple(self.make(rng, *self.args))
        return jax.tree.map(lambda s: random_array(rng, s.shape, s.dtype) if _is_struct(s) else s, self.args, is_leaf=_is_struct)

    def structs(self) -> tuple:
        """The arguments as ``jax.ShapeDtypeStruct`` where they are arrays (for tracing and lowering)."""
        return self.args

    def call(self, fn: Callable[..., Any], impl: Any = None) -> Callable[..., Any]:
        """``fn`` (reconfigured by ``config``) with this case's keywords and ``impl``, taking ``args``."""
        fn = fn.with_config(**self.config) if self.config else fn
        kwargs = dict(self.kwargs)
        return lambda *args: fn(*args, impl=impl, **kwargs)


@dataclasses.dataclass(frozen=True)
class PositionalSpec(ArgSpec):
    """A case of a function that takes static options positionally between its arrays, or arrays
    inside tuples (TileKernels' signatures: ``swiglu_forward(x, "bf16", psum, topk_weights)``,
    ``cast_back((data, sf), ...)``). ``template`` is the positional arguments with the arrays as
    ``jax.ShapeDtypeStruct``; ``args`` are its arrays in order, all that tracing, vmap, sharding and
    the benchmarks see."""

    template: tuple = ()

    def place(self, arrays: Sequence[Any]) -> list:
        """The positional arguments with ``arrays`` (in the order of ``args``) in the arrays' places."""
        leaves, tree = jax.tree.flatten(self.template)
        slots = iter(arrays)
        return jax.tree.unflatten(tree, [next(slots) if _is_struct(a) else a for a in leaves])

    def call(self, fn: Callable[..., Any], impl: Any = None) -> Callable[..., Any]:
        call = super().call(fn, impl)
        return lambda *arrays: call(*self.place(arrays))


def _is_struct(x: Any) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def random_array(rng: np.random.Generator, shape: Sequence[int], dtype: Any) -> np.ndarray:
    """Fresh random values of any dtype: normal floats (cast), or uniform integers over the range."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    return (rng.standard_normal(shape, dtype=np.float32) * 4).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Lowering for "cuda" on any machine, and reading the launches back.


def lower_for_cuda(fn: Callable[..., Any], *args: Any, arch: str = "sm_90a") -> str:
    """The StableHLO text of ``jax.jit(fn)`` lowered for "cuda" (kernels compiled for ``arch``)."""
    with jax_tilek.target_arch(arch):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return lowered.as_text()


def tilek_calls(text: str) -> list[dict]:
    """Every tilek_launch custom call: its name, entries, cubin key and launch record."""
    calls = []
    for line in text.splitlines():
        if "stablehlo.custom_call @tilek_launch" not in line:
            continue
        has_cubin = 'cubin = "\\7FELF' in line
        config = _CUBIN.sub('cubin = "..."', line)
        launch = re.search(r'launch = (?:dense<\[?(?P<v>[-\d, ]*)\]?>|dense<"0x(?P<h>[0-9A-Fa-f]*)">|array<i64(?:: (?P<a>[-\d, ]*))?>)', config)
        if launch.group("h") is not None:  # long records print as the hex of their little-endian int64s
            values = ",".join(map(str, np.frombuffer(bytes.fromhex(launch.group("h")), "<i8")))
        else:
            values = launch.group("v") if launch.group("v") is not None else (launch.group("a") or "")
        calls.append(
            {
                "name": re.search(r'name = "([^"]*)"', config).group(1),
                "entries": re.search(r'entries = "([^"]*)"', config).group(1),
                "cubin_key": re.search(r'cubin_key = "([0-9a-f]{64})"', config).group(1),
                "has_cubin": has_cubin,
                "launch": [int(v) for v in values.split(",") if v.strip()],
            }
        )
    return calls


def decode_record(record: list[int]) -> dict:
    """Parses a launch record the way ffi/launcher.cc does (DecodeRecord), for assertions."""
    it = iter(record)
    version, num_buffers, num_zero, num_tma, num_kernels = (next(it) for _ in range(5))
    out = {"version": version, "num_buffers": num_buffers, "zero_fill": [next(it) for _ in range(num_zero)], "tma": [], "kernels": []}
    for _ in range(num_tma):
        buffer, offset, dtype, rank = (next(it) for _ in range(4))
        t = {"buffer": buffer, "byte_offset": offset, "dtype": dtype, "rank": rank}
        t["dims"] = [next(it) for _ in range(rank)]
        t["strides"] = [next(it) for _ in range(rank - 1)]
        t["box"] = [next(it) for _ in range(rank)]
        t["element_strides"] = [next(it) for _ in range(rank)]
        t["interleave"], t["swizzle"], t["l2"], t["oob"] = (next(it) for _ in range(4))
        out["tma"].append(t)
    for _ in range(num_kernels):
        k = {"grid": [next(it) for _ in range(3)], "block": [next(it) for _ in range(3)], "smem": next(it)}
        k["cluster"] = [next(it) for _ in range(3)]
        k["flags"] = next(it)
        k["args"] = [tuple(next(it) for _ in range(3)) for _ in range(next(it))]
        out["kernels"].append(k)
    assert next(it, None) is None, "record longer than its header says"
    return out


def jit_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` as one jitted program, the arrays among the arguments traced and the
    other values static: called eagerly, a reference compiles an XLA program per operation."""
    call, arrays = over_arrays(lambda a, kw: fn(*a, **kw), (args, kwargs))
    return jax.jit(call)(*arrays)


def assert_bytes_equal(actual: Any, expected: Any, what: str = "") -> None:
    """Bit-exact equality of two arrays of one dtype and shape (NaN payloads and signed zeros count)."""
    a, e = np.ascontiguousarray(np.asarray(actual)), np.ascontiguousarray(np.asarray(expected))
    assert (a.shape, a.dtype) == (e.shape, e.dtype), f"{what}: {a.dtype}{list(a.shape)} != {e.dtype}{list(e.shape)}"
    if a.size == 0:
        return
    differ = (a.view(np.uint8).reshape(a.size, -1) != e.view(np.uint8).reshape(e.size, -1)).any(axis=1)
    where = np.argwhere(differ.reshape(a.shape))
    assert where.size == 0, f"{what}: {len(where)} of {a.size} elements differ, first at {where[:5].tolist()}"


def assert_trees_equal(actual: Any, expected: Any, tolerance: float | None = None, what: str = "") -> None:
    """Equal pytrees: bit-exact leaves, or within ``tolerance`` (rtol = atol) in float64."""
    leaves_a, tree_a = jax.tree.flatten(actual)
    leaves_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e, f"{what}: structure {tree_a} != {tree_e}"
    for i, (a, e) in enumerate(zip(leaves_a, leaves_e)):
        if tolerance is None:
            assert_bytes_equal(a, e, f"{what} result {i}")
        else:
            a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
            np.testing.assert_allclose(a64, e64, rtol=tolerance, atol=tolerance, err_msg=f"{what} result {i}")


# ---------------------------------------------------------------------------------------------
# The contract.


def pytest_generate_tests(metafunc: Any) -> None:
    """Parametrizes a contract test's ``case`` with its class's cases (tests/conftest.py uses it)."""
    cls = metafunc.cls
    if "case" not in metafunc.fixturenames or cls is None or not issubclass(cls, OpContract):
        return
    import pytest

    name = metafunc.function.__name__
    marks = [pytest.mark.gpu] if name == "test_gpu_matches_reference" else []
    cases = [pytest.param(c, marks=marks, id=c.name) for c in cls.arg_specs() if name in _TRACED_ONLY or not c.bench]
    metafunc.parametrize("case", cases)


# Contract tests that make no arrays, so benchmark-sized cases run them too.
_TRACED_ONLY = ("test_abstract_eval_matches_reference", "test_lowers_to_its_launches", "test_tilelang_refused_off_gpu")


def _skip(reason: str) -> None:
    import pytest

    pytest.skip(reason)


class OpContract:
    """The contract every jax_tilek op keeps; subclass with ``fn`` (see the module docstring).

    Attributes:
        fn: the public function, called as ``fn(*args, impl=..., **kwargs)``; its cases are ``fn.cases``.
        cases: the cases, when not ``fn.cases``.
        rows: the op is row-wise (:class:`jax_tilek.op.Rows`), or otherwise folds vmap into its
          leading axis: vmap lowers to one launch, and the leading axis of the first array argument
          shards without collectives.
        differentiable: argument positions ``jax.grad`` is checked for (empty: not differentiable).
        vmappable: whether vmap over a stack of two draws of every array argument is checked.
        bad_inputs: ``(args, kwargs, exception, message regex)``: calls that must fail at trace time
          (the arrays and structs among ``args`` are traced; other values are passed as they are).
    """

    fn: Callable[..., Any]
    cases: Sequence[ArgSpec] | None = None
    rows: bool = False
    differentiable: tuple[int, ...] = ()
    vmappable: bool = True
    bad_inputs: Sequence[tuple[tuple, Mapping[str, Any], type, str]] = ()

    @property
    def function(self) -> Callable[..., Any]:
        return type(self).fn  # a plain function in a class body would bind as a method

    @classmethod
    def arg_specs(cls) -> Sequence[ArgSpec]:
        return cls.cases if cls.cases is not None else cls.fn.cases

    def bound(self, case: ArgSpec, impl: Any, args: Sequence[Any]) -> tuple[Callable[..., Any], list[Any]]:
        """The case's call with ``impl`` as a function of its array arguments only (the others, such
        as ``eps`` or a format name, closed over), and those arrays taken from ``args``."""
        return over_arrays(case.call(self.function, impl), args)

    def jitted(self, case: ArgSpec, impl: Any, args: Sequence[Any]) -> tuple[Callable[..., Any], list[Any]]:
        """:meth:`bound` under ``jax.jit``, one jitted function per case, ``impl`` and non-array
        arguments in this process: the tests of a case trace, lower and compile it once."""
        call, arrays = self.bound(case, impl, args)
        leaves, tree = jax.tree.flatten(list(args), is_leaf=lambda x: x is None)
        key = (self.function, id(case), impl, tree, tuple(a for a in leaves if not (_is_struct(a) or _is_array(a))))
        try:
            return _JITTED.setdefault(key, (case, jax.jit(call)))[1], arrays
        except TypeError:  # an unhashable option
            return jax.jit(call), arrays

    # -- off the GPU ----------------------------------------------------------------------------

    def test_abstract_eval_matches_reference(self, case: ArgSpec) -> None:
        kernel = jax.eval_shape(*_flat(self.bound(case, None, case.structs())))
        reference = jax.eval_shape(*_flat(self.bound(case, "xla", case.structs())))
        assert jax.tree.structure(kernel) == jax.tree.structure(reference)
        for k, r in zip(jax.tree.leaves(kernel), jax.tree.leaves(reference)):
            assert (k.shape, k.dtype) == (r.shape, r.dtype)

    def test_default_path_off_gpu_is_the_reference(self, case: ArgSpec, rng: np.random.Generator) -> None:
        if jax_tilek.kernels_available():
            _skip("the default path runs the kernel here (see test_gpu_matches_reference)")
        args = case.arrays(rng)
        call, arrays = self.jitted(case, None, args)
        reference, _ = self.jitted(case, "xla", args)
        default, xla = (f.lower(*arrays).as_text(debug_info=False) for f in (call, reference))
        if default != xla:  # the same program needs no run; a differently staged one must compute the same
            assert_trees_equal(call(*arrays), reference(*arrays), what=case.name)

    def test_lowers_to_its_launches(self, case: ArgSpec) -> None:
        calls = tilek_calls(lower_for_cuda(*_flat(self.bound(case, None, case.structs()))))
        assert len(calls) == case.launches, [c["name"] for c in calls]
        assert all(c["has_cubin"] for c in calls)
        if case.config:  # the configuration reaches a kernel (a function that bypasses its ops would drop it)
            default = dataclasses.replace(case, config={})
            keys = [c["cubin_key"] for c in tilek_calls(lower_for_cuda(*_flat(self.bound(default, None, default.structs()))))]
            changed = [c["cubin_key"] for c in calls] != keys
            if not changed and self.differentiable:  # a backward kernel's configuration
                changed = self._gradient_keys(case) != self._gradient_keys(default)
            assert changed, f"{case.name}: with_config({case.config}) changed no kernel"

    def _gradient_keys(self, case: ArgSpec) -> list[str]:
        """The cubin keys of the gradient (of the floating outputs' sum, by every floating input) lowered for "cuda"."""
        fn, *structs = _flat(self.bound(case, None, case.structs()))
        argnums = tuple(i for i, s in enumerate(structs) if jnp.issubdtype(s.dtype, jnp.floating))

        def scalar(*arrays):
            return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(fn(*arrays)) if jnp.issubdtype(o.dtype, jnp.floating))

        return [c["cubin_key"] for c in tilek_calls(lower_for_cuda(jax.grad(scalar, argnums=argnums), *structs))]

    def test_tilelang_refused_off_gpu(self, case: ArgSpec) -> None:
        if jax_tilek.kernels_available():
            _skip("kernels run here")
        import pytest

        call, structs = self.bound(case, "tilelang", case.structs())
        with pytest.raises(ValueError, match="impl='tilelang'"):
            jax.jit(call).lower(*structs).compile()

    def test_vmap_matches_a_loop(self, case: ArgSpec, rng: np.random.Generator) -> None:
        if not self.vmappable:
            _skip("not vmappable")
        draws = [case.arrays(rng) for _ in range(2)]
        one, _ = self.jitted(case, None, draws[0])  # compiled once for both items: eager op-by-op dispatch is slow
        call, _ = self.bound(case, None, draws[0])
        stacked = [np.stack([_host(a) for a in pair]) for pair in zip(*(self.bound(case, None, d)[1] for d in draws))]
        batched = jax.jit(jax.vmap(call))(*stacked)
        expected = jax.tree.map(lambda *ys: np.stack([_host(y) for y in ys]), *[one(*(s[k] for s in stacked)) for k in range(2)])
        assert_trees_equal(batched, expected, self.vmap_tolerance(case), what=f"{case.name} vmap")
        if self.rows:  # a batch of the token operand alone (shared weights) folds into the tokens
            structs = [jax.ShapeDtypeStruct(s.shape if i == 0 else s.shape[1:], s.dtype) for i, s in enumerate(stacked)]
            text = lower_for_cuda(jax.vmap(call, in_axes=(0,) + (None,) * (len(structs) - 1)), *structs)
            assert len(tilek_calls(text)) == case.launches and "stablehlo.while" not in text, "vmap did not fold into the tokens"

    def vmap_tolerance(self, case: ArgSpec) -> float | None:
        """The tolerance of vmap against the loop: None, bit-exact."""
        return None

    def test_grad_matches_the_reference(self, case: ArgSpec, rng: np.random.Generator) -> None:
        if not self.differentiable:
            _skip("not differentiable")
        args = case.arrays(rng)
        argnums = tuple(k for k, i in enumerate(_array_positions(args)) if i in self.differentiable)
        out = jax.eval_shape(*_flat(self.bound(case, "xla", args)))
        weights = [jnp.asarray(random_array(rng, o.shape, np.float32)) for o in jax.tree.leaves(out)]

        def loss(impl):
            call, arrays = self.bound(case, impl, args)

            def scalar(*arrays):
                outs = jax.tree.leaves(call(*arrays))
                return sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in zip(outs, weights) if jnp.issubdtype(o.dtype, jnp.floating))

            return jax.jit(jax.grad(scalar, argnums=argnums))(*arrays)

        for g, w in zip(jax.tree.leaves(loss(None)), jax.tree.leaves(loss("xla"))):
            np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=2e-2, atol=2e-2)

    def test_token_sharding(self, case: ArgSpec, rng: np.random.Generator) -> None:
        if not self.rows:
            _skip("not row-wise")
        from jax.sharding import NamedSharding, PartitionSpec

        devices = jax.devices("cpu")
        args = case.arrays(rng)
        f, arrays = self.jitted(case, None, args)
        reference, _ = self.jitted(case, "xla", args)
        if len(devices) < 8 or not arrays or np.ndim(arrays[0]) == 0 or np.shape(arrays[0])[0] % 8:
            _skip("needs 8 host devices and a token count divisible by 8")
        mesh = jax.make_mesh((8,), ("d",), devices=devices[:8])
        sharded = [jax.device_put(arrays[0], NamedSharding(mesh, PartitionSpec("d"))), *arrays[1:]]
        assert_trees_equal(f(*sharded), reference(*arrays), what=f"{case.name} sharded")
        hlo = f.lower(*sharded).compile().as_text()
        assert not re.search(r"all-gather|all-to-all|collective-permute|all-reduce", hlo), "sharded tokens were exchanged"

    def test_export_round_trip(self, case: ArgSpec, rng: np.random.Generator) -> None:
        exported = jax_tilek.export(*_flat(self.bound(case, None, case.structs())), arch="sm_90a", platforms=("cuda", "cpu"))
        restored = jax.export.deserialize(exported.serialize())
        reference, arrays = self.jitted(case, "xla", case.arrays(rng))
        with jax.default_device(jax.devices("cpu")[0]):
            assert_trees_equal(restored.call(*arrays), reference(*arrays), what=f"{case.name} export")

    def test_bad_inputs_raise_at_trace_time(self) -> None:
        if not self.bad_inputs:
            _skip("no bad inputs listed")
        import pytest

        for args, kwargs, error, message in self.bad_inputs:
            call, arrays = over_arrays(lambda a, kw: self.function(*a, **kw), (args, kwargs))
            with pytest.raises(error, match=message):
                jax.eval_shape(call, *arrays)

    # -- on the GPU -----------------------------------------------------------------------------

    def test_gpu_matches_reference(self, case: ArgSpec, rng: np.random.Generator, on_gpu: Callable[..., Any]) -> None:
        if not jax_tilek.kernels_available():
            _skip("needs an NVIDIA Hopper/Blackwell GPU")
        args = case.arrays(rng)
        call, arrays = self.bound(case, "tilelang", args)
        got = on_gpu(call, *arrays)
        reference, _ = self.bound(case, "xla", args)
        assert_trees_equal(got, reference_on_cpu(reference, arrays), case.tolerance, what=case.name)


def reference_on_cpu(reference: Callable[..., Any], arrays: Sequence[Any]) -> Any:
    """``jax.jit(reference)(*arrays)`` on the CPU, what kernels are compared with on the GPU: XLA:GPU's
    fusions may round f32 sqrt and division differently from the kernels and from XLA:CPU."""
    with jax.default_device(jax.devices("cpu")[0]):
        return jax.jit(reference)(*arrays)


def _flat(bound: tuple[Callable[..., Any], list[Any]]) -> list[Any]:
    """``(fn, args)`` as ``[fn, *args]``, for ``jax.eval_shape(*_flat(...))`` and the like."""
    fn, args = bound
    return [fn, *args]


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array))


def _host(x: Any) -> np.ndarray:
    """``x`` as a NumPy array of its JAX dtype (stacked and sliced without compiling XLA programs)."""
    return np.asarray(jax.device_put(x))


_JITTED: dict[tuple, tuple[ArgSpec, Callable[..., Any]]] = {}  # OpContract.jitted's functions (with their case, keeping its id)


# ---------------------------------------------------------------------------------------------
# Every family's cases: for benchmarks and the kernel-cache preparation.


def public_cases(families: Sequence[str] = FAMILIES) -> Iterator[tuple[str, Callable[..., Any], ArgSpec]]:
    """(qualified name, public function, case) for every case of every family's public functions."""
    seen = set()
    for family in families:
        module = importlib.import_module(family)
        for name in getattr(module, "__all__", ()):
            fn = getattr(module, name)
            if id(fn) in seen:  # a re-export
                continue
            seen.add(id(fn))
            for case in getattr(fn, "cases", ()):
                yield f"{family.rsplit('.', 1)[-1]}.{name}", fn, case


def prepare(arch: str, families: Sequence[str] = FAMILIES) -> int:
    """Compiles into the kernel cache every kernel the cases of ``families`` use on ``arch``: each case
    as called, vmapped over its arrays, and (for functions with a custom VJP) differentiated; returns
    the number of programs lowered. Serial, in this process (``python -m jax_tilek precompile`` runs
    the same programs in parallel worker processes)."""
    count = 0
    for _, fn, case in public_cases(families):
        programs = case_programs(fn, case)
        for program, args in programs:
            jax_tilek.precompile(program, *args, arch=arch)
        count += len(programs)
    return count


def case_programs(fn: Callable[..., Any], case: ArgSpec) -> list[tuple[Callable[..., Any], list[Any]]]:
    """The programs :func:`prepare` lowers for one case: as called, vmapped, and differentiated."""
    call, structs = over_arrays(case.call(fn), case.structs())
    programs = [(call, structs)]
    if structs:
        stacked = [jax.ShapeDtypeStruct((2, *s.shape), s.dtype) for s in structs]
        programs.append((jax.vmap(call), stacked))
    floats = [i for i, s in enumerate(structs) if jnp.issubdtype(s.dtype, jnp.floating)]
    if getattr(fn, "differentiable", False) and floats:
        programs.append((jax.grad(lambda *a: sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(call(*a))), floats), structs))
    return programs


def over_arrays(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Callable[..., Any], list[Any]]:
    """``fn`` as a function of the array leaves of ``args`` only (other leaves, such as ``eps``, a
    format name or None, closed over), and those arrays."""
    leaves, tree = jax.tree.flatten(list(args), is_leaf=lambda x: x is None)
    arrays = [i for i, a in enumerate(leaves) if _is_struct(a) or _is_array(a)]

    def call(*values: Any) -> Any:
        full = list(leaves)
        for i, v in zip(arrays, values):
            full[i] = v
        return fn(*jax.tree.unflatten(tree, full))

    return call, [leaves[i] for i in arrays]


def _array_positions(args: Sequence[Any]) -> list[int]:
    """For each array leaf of ``args`` (in :func:`over_arrays` order), the position of its argument."""
    return [i for i, a in enumerate(args) for _ in over_arrays(lambda *_: None, [a])[1]]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jax_tilek.testing --arch sm_90a``: ``python -m jax_tilek precompile`` for the families."""
    from jax_tilek._cli import main as cli

    return cli(["precompile", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
