#!/usr/bin/env bash
# Build machine (TileLang + nvcc, no GPU): compile every kernel configuration the GPU tests and the
# benchmarks use into .tilek_cache/ (and write the exported test program there). That is also the
# CPU tests' cache: entries are content-addressed, so what else it holds is never launched by mistake
# (FRESH=1 starts from an empty one, to ship only what the GPU run needs).
set -euo pipefail
ARCH=${1:-sm_90a}
export JAX_TILEK_CACHE_DIR="$PWD/.tilek_cache"
[ "${FRESH:-0}" != 1 ] || rm -rf "$JAX_TILEK_CACHE_DIR"
JAX_TILEK_PRECOMPILE=$ARCH python -m pytest -q -n 2 -m gpu -p no:cacheprovider tests | tail -3
python -m benchmarks.run --precompile "$ARCH" | tail -3
rm -rf .tilek_cache/.locks   # no one compiles now: nothing to ship there
du -sh .tilek_cache
