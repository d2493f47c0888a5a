#!/usr/bin/env bash
# Build machine (TileLang + nvcc, no GPU): compile every kernel configuration the GPU tests and the
# benchmarks use into .tilek_cache/: the op families' named cases (ARG_SPECS, which the GPU tests and
# benchmarks draw from), the other GPU tests' programs and exported artifact, the overhead chains.
# That is also the CPU tests' cache: entries are content-addressed, so what else it holds is never
# launched by mistake (FRESH=1 starts from an empty one, to ship only what the GPU run needs).
set -euo pipefail
ARCH=${1:-sm_90a}
export JAX_TILEK_CACHE_DIR="$PWD/.tilek_cache"
[ "${FRESH:-0}" != 1 ] || rm -rf "$JAX_TILEK_CACHE_DIR"
python -m jax_tilek.testing --arch "$ARCH"
PYTHONPATH="$PWD:$PWD/tests" python tests/gpu_programs.py prepare "$ARCH"
python -c "import sys; from benchmarks import overhead; overhead.precompile(sys.argv[1])" "$ARCH"
for model in tiny small; do
  for variant in "" --mhc --engram --fp8; do python examples/train_moe.py --precompile "$ARCH" --model $model $variant > /dev/null && echo "precompiled train_moe --model $model $variant"; done
done
# The wide (hidden 4096) and deep (DeepSeek-V3 proportions) models with and without mHC: what mHC costs a
# training step where the matmuls dominate.
for model in wide deep; do
  for variant in "" --mhc; do python examples/train_moe.py --precompile "$ARCH" --model $model $variant > /dev/null && echo "precompiled train_moe --model $model $variant"; done
done
# The tunings the benchmarks compare (the *_variants families) are configurations no case uses, and
# the layer benchmarks (nnx) run whole models whose gates and GEMMs take sizes of their own:
families=$(python -m jax_tilek bench --list)
online='_variants$|^nnx$'
python -m benchmarks.run --precompile "$ARCH" --only "$(grep -E "$online" <<< "$families" | paste -sd,)"
# Every other kernel the benchmarks launch must be among those the cases compiled:
JAX_TILEK_OFFLINE=1 python -m benchmarks.run --precompile "$ARCH" --only "$(grep -vE "$online" <<< "$families" | paste -sd,)" | tail -1
rm -rf .tilek_cache/.locks   # no one compiles now: nothing to ship there
du -sh .tilek_cache
