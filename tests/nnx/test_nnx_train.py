"""examples/train_moe.py on a shrunken model: the training step lowers the loss, a run saves a
checkpoint that a second run resumes exactly where an uninterrupted run would be, and the --mhc,
--engram and --fp8 variants train."""

import dataclasses
import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT

nnx = pytest.importorskip("flax.nnx")
pytest.importorskip("optax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("tqdm")

from jax_tilek.engram import SinkhornMomentumState  # noqa: E402


@pytest.fixture(scope="module")
def train_moe():
    spec = importlib.util.spec_from_file_location("train_moe", os.path.join(ROOT, "examples", "train_moe.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    small = dict(dim=128, layers=1, heads=2, experts=8, topk=2, ffn=128, seq=32, batch=4, steps=6, lr=3e-3, engram_layers=(0,),
                 mhc_sinkhorn_repeat=4)  # fmt: skip
    module.CONFIGS["tiny"] = dataclasses.replace(module.CONFIGS["tiny"], **small)
    return module


def test_train_step_lowers_the_loss(train_moe):
    tok, train_ids, _ = train_moe.load_data(200_000)
    c = dataclasses.replace(train_moe.CONFIGS["tiny"], vocab=tok.vocab, steps=20)
    _, state, train_step, eval_step, _ = train_moe.make_fns(c)
    batch = train_moe.batch_at(train_ids, 0, c.batch, c.seq, seed=0)
    before = float(eval_step(state, batch))
    assert abs(before - np.log(c.vocab)) < 1.0  # starts near ln(vocab)
    for _ in range(5):
        state, metrics = train_step(state, batch)
    assert float(eval_step(state, batch)) < before - 0.5
    assert np.isfinite(float(metrics["aux"]))


def test_resume_continues_the_curve(train_moe, tmp_path):
    common = ["--data-bytes", "200000", "--eval-every", "2"]
    straight = train_moe.main(["--steps", "6", "--out", str(tmp_path / "straight"), *common])
    first = train_moe.main(["--steps", "4", "--out", str(tmp_path / "resumed"), *common])
    resumed = train_moe.main(["--steps", "6", "--out", str(tmp_path / "resumed"), *common])
    assert first["start"] == 0 and resumed["start"] == 4
    assert {s: v for s, v in resumed["losses"].items() if s <= 4} == first["losses"]  # the first run's rows kept
    common = sorted(set(resumed["losses"]) & set(straight["losses"]))
    assert common[-1] == 6
    np.testing.assert_allclose([resumed["losses"][s] for s in common], [straight["losses"][s] for s in common], rtol=1e-5)
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-5)
    out = tmp_path / "resumed"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6
    assert (out / "loss.png").stat().st_size > 0 and sorted(p.name for p in (out / "ckpt").iterdir()) == ["4", "6"]
    assert len(resumed["sample"]) == train_moe.CONFIGS["tiny"].seq


def test_variants_train(train_moe, tmp_path, capsys):
    """--mhc, --engram and --fp8 together (one run: each is a full compile of the job on the CPU)."""
    run = train_moe.main(["--mhc", "--engram", "--fp8", "--steps", "8", "--eval-every", "1000", "--data-bytes", "200000", "--out", str(tmp_path),
                          "--profile", str(tmp_path / "trace")])  # fmt: skip
    printed = capsys.readouterr().out
    assert "mHC (n = 4) + Engram + FP8 MoE" in printed and "traced 3 steps" in printed
    from benchmarks import step_profile

    assert step_profile.kernel_times(str(tmp_path / "trace"), plane="/host:CPU", line="tf_XLA")  # a CPU trace's XLA threads
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["8"]  # the traced steps are not saved
    losses = run["losses"]
    assert sorted(losses) == [1, 8] and np.isfinite(list(losses.values())).all()
    assert losses[8] < losses[1] - 0.8
    assert np.isfinite(run["eval_loss"]) and len(run["sample"]) == train_moe.CONFIGS["tiny"].seq


def test_engram_tables_take_sinkhorn_momentum(train_moe):
    """Only the Engram table's optimizer state is Sinkhorn momentum; everything else is AdamW."""
    c = dataclasses.replace(train_moe.CONFIGS["tiny"], vocab=100)
    model = train_moe.Transformer(c, engram=True, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    state = train_moe.optimizer_for(c, engram=True).init(params)
    momenta = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, SinkhornMomentumState)) if isinstance(s, SinkhornMomentumState)]
    assert len(momenta) == 1
    shapes = [a.shape for a in jax.tree.leaves(momenta[0].momentum)]
    assert shapes == [model.blocks[0].engram.table.shape]


@pytest.fixture(scope="module")
def train_moe_as_shipped():
    """The job with its own configurations: the shapes ``--precompile`` compiled."""
    spec = importlib.util.spec_from_file_location("train_moe_as_shipped", os.path.join(ROOT, "examples", "train_moe.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.gpu
@pytest.mark.timeout(400)  # three programs compiled per implementation
def test_kernels_train_like_the_references(train_moe_as_shipped, tmp_path):
    """The tiny model for 60 steps on the kernels and on the references (XLA on the same GPU): both
    learn, and the curves agree to bfloat16 rounding; prints both rates (tokens/s after the first step)."""
    common = ["--steps", "60", "--eval-every", "1000"]
    runs = {impl: train_moe_as_shipped.main(["--impl", impl, "--out", str(tmp_path / impl), *common]) for impl in ("tilelang", "xla")}
    kernels, reference = runs["tilelang"], runs["xla"]
    assert kernels["losses"][60] < kernels["losses"][1] - 1.0
    for step in (1, 10, 60):
        assert kernels["losses"][step] == pytest.approx(reference["losses"][step], abs=0.05), step
    assert kernels["eval_loss"] == pytest.approx(reference["eval_loss"], abs=0.05)
    print(f"tokens/s: tilelang {kernels['tokens_per_s']:,.0f}, xla {reference['tokens_per_s']:,.0f} "
          f"({kernels['tokens_per_s'] / reference['tokens_per_s']:.2f}x)")
