#!/usr/bin/env bash
# Build machine (TileLang + nvcc, no GPU): compile every kernel configuration the GPU tests and the
# benchmarks use into a fresh .tilek_cache/ (and write the exported test program there).
set -euo pipefail
ARCH=${1:-sm_90a}
export JAX_TILEK_CACHE_DIR="$PWD/.tilek_cache"
rm -rf "$JAX_TILEK_CACHE_DIR"
JAX_TILEK_PRECOMPILE=$ARCH python -m pytest -q -n 2 -m gpu -p no:cacheprovider tests | tail -3
python -m benchmarks.run --precompile "$ARCH" | tail -3
du -sh .tilek_cache
