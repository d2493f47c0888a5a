#!/usr/bin/env bash
# The GPU workflow, run from the repository root on a GPU machine that has no TileLang:
#   install jax_tilek (builds the launcher), run the GPU tests from the shipped kernel cache with XLA
#   command buffers at their default, run the benchmarks, print a short table. Logs go to $OUT.
#
# Build machine first (TileLang + nvcc, no GPU needed):   bash benchmarks/gpu_prepare.sh
# Then ship the checkout with .tilek_cache/ and run:     bash benchmarks/gpu_run.sh [pytest paths/args]
# To prepare an image that installs offline: pip install "scikit-build-core>=0.10" cmake (and jax, jaxlib).
# BENCH_ONLY=family,... limits the benchmarks (default: all); BENCH_ONLY=none skips them; BENCH_TIMEOUT=s per family.
# GPU_TEST_WORKERS=N runs the tests in N processes sharing the GPU (default 4; compiling is the slow part).
set -uo pipefail
OUT=${OUT:-/tmp/jax_tilek_gpu}
mkdir -p "$OUT"
export JAX_TILEK_CACHE_DIR="$PWD/.tilek_cache" JAX_TILEK_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
# Install (builds the launcher). A prepared image has the build dependencies (scikit-build-core, cmake,
# jaxlib) and needs no package index: --no-deps --no-build-isolation. An environment installed from
# README's command lacks scikit-build-core, so it builds with build isolation (pip fetches the build
# dependencies from the index). Either way the runtime dependencies are expected to be installed.
if $PY -c "import scikit_build_core, jaxlib" > /dev/null 2>&1 && { command -v cmake || $PY -c "import cmake"; } > /dev/null 2>&1; then
  echo "install: prepared image (build dependencies present): pip install --no-deps --no-build-isolation ."
  install=(--no-deps --no-build-isolation)
else
  echo "install: no scikit-build-core/cmake here: pip install --no-deps . (with build isolation; needs the package index)"
  install=(--no-deps)
fi
$PY -m pip install "${install[@]}" . > "$OUT/install.log" 2>&1 || { tail -40 "$OUT/install.log"; exit 1; }
$PY -c "import jax, jax_tilek; print('jax', jax.__version__, jax.devices(), 'kernels:', jax_tilek.kernels_available())"

# A hung kernel fails its test after TEST_TIMEOUT seconds (pytest-timeout, where installed), with the
# worker's stacks in the log, instead of holding a worker to the end of the run.
if $PY -c "import pytest_timeout" > /dev/null 2>&1; then
  export PYTEST_ADDOPTS="${PYTEST_ADDOPTS:-} --timeout=${TEST_TIMEOUT:-90} --timeout-method=thread"
fi

# The tests that start fresh GPU processes run alone first: beside busy workers an 80 GB card may
# have no memory left for a new CUDA context ("no supported devices found").
serial_rc=0
if [ $# -eq 0 ]; then
  XLA_PYTHON_CLIENT_PREALLOCATE=false $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_runtime.py 2>&1 | tee "$OUT/gpu_tests_serial.log" | tail -5
  serial_rc=${PIPESTATUS[0]}
  set -- tests --ignore=tests/test_gpu_runtime.py
fi
workers=${GPU_TEST_WORKERS:-4}
[ "$workers" -le 1 ] || set -- -n "$workers" "$@"
# -v: each test's outcome is in the log as it finishes, so a run cut short still names what ran.
XLA_PYTHON_CLIENT_PREALLOCATE=false $PY -m pytest -v -m gpu -p no:cacheprovider --durations=30 "$@" > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
grep -E "^(FAILED|ERROR)|Timeout|slowest|^[0-9.]+s (call|setup)|passed|failed" "$OUT/gpu_tests.log" | tail -60
tests_rc=$(( tests_rc || serial_rc ))
bench_rc=0
if [ "${BENCH_ONLY:-}" != none ]; then
  # One process per family, each bounded by BENCH_TIMEOUT seconds (default 300): a slow family costs
  # only itself, and every finished case is also a JSON line in bench_<family>.log.
  families=${BENCH_ONLY:-$($PY -m jax_tilek bench --list | tr '\n' ',')}
  for family in ${families//,/ }; do
    timeout "${BENCH_TIMEOUT:-300}" $PY -m jax_tilek bench --family "$family" --json "$OUT/bench_$family.json" > "$OUT/bench_$family.log" 2>&1
    rc=$?; echo "benchmarks $family rc=$rc"; bench_rc=$(( bench_rc || rc ))
  done
  plot=()
  ! $PY -c "import matplotlib" > /dev/null 2>&1 || plot=(--plot "$OUT/plots")
  $PY -c "import glob, json, sys; runs = [json.load(open(p)) for p in sorted(glob.glob(sys.argv[1] + '/bench_*.json'))]; \
json.dump({'device': runs[0]['device'] if runs else '?', 'results': [r for x in runs for r in x['results']], 'overhead': [c for x in runs for c in x.get('overhead') or []]}, open(sys.argv[1] + '/bench.json', 'w'), indent=1)" "$OUT"
  $PY -m jax_tilek bench --from-json "$OUT/bench.json" "${plot[@]}" 2>&1 | tee "$OUT/bench.log"
fi
echo "gpu tests rc=$tests_rc benchmarks rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
