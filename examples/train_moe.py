"""Trains a small DeepSeek-style MoE transformer on Python's own standard-library sources.

Pre-norm blocks (``jax_tilek.nnx.RMSNorm`` with the residual add fused), causal attention
(``jax.nn.dot_product_attention``, queries and keys rotated by ``jax_tilek.nnx.RotaryEmbedding``) and an
MoE FFN (``jax_tilek.nnx.MoE``: routed SwiGLU experts plus a shared expert, with the load-balancing
loss). Text: the ``.py`` files of the running Python's stdlib (nothing is downloaded), a character
vocabulary built from them, the last files held out.

``--mhc N`` widens the residual stream to N mHC streams (``jax_tilek.nnx.hyper_expand`` from the
embedding, every attention and MoE sub-layer in a ``HyperConnection``, ``HyperHead`` before the final
norm). ``--engram`` adds a ``jax_tilek.nnx.EngramGate`` (hashed 2- and 3-gram tables gated into the
residual stream) at the start of the blocks in ``Config.engram_layers``, before attention, as DeepSeek's
Engram demo places it (a shallow layer: its ``layer_ids`` are 1 and 15 of 30); its tables train with
``jax_tilek.engram.sinkhorn_momentum`` through ``optax.multi_transform``, everything else with AdamW.
``--fp8`` trains the MoE layers (routed and shared experts) in FP8, DeepSeek-V3's way: e4m3 with 1 × 128
activation and 128 × 128 weight block scales, forward and backward products.

    python examples/train_moe.py                      # tiny model, CPU-friendly (kernels on Hopper/Blackwell)
    python examples/train_moe.py --steps 600          # again: resumes from the checkpoint in --out
    python examples/train_moe.py --mhc --engram       # mHC residual streams (n = 4) and the Engram gate
    python examples/train_moe.py --fp8                # FP8 expert matmuls
    python examples/train_moe.py --model wide --mhc  # hidden 4096 (DeepSeek-scale width): mHC's cost where matmuls dominate
    python examples/train_moe.py --model deep --mhc  # DeepSeek-V3's layer proportions (hidden 7168, 8 + 1 experts of 2048)
    python examples/train_moe.py --precompile sm_90a  # fill the kernel cache for exactly this job, then exit

Writes to ``--out``: ``metrics.jsonl`` (one JSON object per logged step and per evaluation),
``loss.png``, ``vocab.json`` and orbax checkpoints under ``ckpt/``. Needs ``jax_tilek[nnx]``, tqdm and
matplotlib.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sysconfig
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

import jax_tilek
from jax_tilek.engram import sinkhorn_momentum
from jax_tilek.nnx import (
    EMBED,
    HEAD_DIM,
    HEADS,
    VOCAB,
    EngramGate,
    HyperConnection,
    HyperHead,
    MoE,
    RMSNorm,
    RotaryEmbedding,
    hyper_expand,
    is_table,
    ngram_token_ids,
    param,
)


@dataclasses.dataclass(frozen=True)
class Config:
    dim: int
    layers: int
    heads: int
    experts: int
    topk: int
    ffn: int  # per expert; the shared expert has the same size
    seq: int
    batch: int
    steps: int  # the learning-rate schedule's length, and the default --steps
    lr: float
    alignment: int = 128  # rows per expert segment (the grouped GEMM's M-tile)
    aux_coef: float = 1e-2
    vocab: int = 0  # set from the data
    # --engram: the blocks that get a gate, the tables' sizes [n-gram order 2..N][table], their width
    engram_layers: tuple[int, ...] = (1,)
    engram_vocab: tuple[tuple[int, ...], ...] = ((4093, 4091), (8191, 8179))
    engram_dim: int = 32
    mhc_sinkhorn_repeat: int = 20  # --mhc: Sinkhorn iterations of every comb mix (the mHC paper's 20)


# The rotary kernels take rotary dims of 64 or 128.
CONFIGS = {
    "tiny": Config(dim=128, layers=2, heads=2, experts=8, topk=2, ffn=128, seq=128, batch=16, steps=500, lr=3e-3),
    "small": Config(dim=512, layers=6, heads=8, experts=32, topk=4, ffn=256, seq=512, batch=32, steps=2000, lr=1e-3,
                    engram_layers=(1, 3), engram_vocab=((16381, 16369), (65521, 65519)), engram_dim=64),
    # DeepSeek-scale width (head dim 128) in two layers on one GPU, for what mHC costs where matmuls dominate.
    "wide": Config(dim=4096, layers=2, heads=32, experts=16, topk=4, ffn=1024, seq=1024, batch=8, steps=200, lr=3e-4),
    # DeepSeek-V3's layer proportions (hidden 7168, expert intermediate 2048, 8 routed experts + 1 shared
    # per token: about as many matmul FLOPs per residual element), two layers on one GPU.
    "deep": Config(dim=7168, layers=2, heads=56, experts=16, topk=8, ffn=2048, seq=1024, batch=4, steps=100, lr=3e-4),
}


# ---------------------------------------------------------------------------------------------
# Data: the stdlib's .py sources, a character vocabulary.


def stdlib_text(max_bytes: int) -> list[str]:
    """The running Python's stdlib ``.py`` files (tests and site-packages skipped) in sorted order, up
    to about ``max_bytes`` in all."""
    root = sysconfig.get_paths()["stdlib"]
    texts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idle_test", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py") and total < max_bytes:
                with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                    texts.append(f.read())
                total += len(texts[-1])
    return texts


class CharTokenizer:
    """Characters seen at least ``min_count`` times get an id; everything else is id 0 (unknown)."""

    def __init__(self, chars: str):
        self.chars = chars
        self.ids = {c: i + 1 for i, c in enumerate(chars)}

    @classmethod
    def fit(cls, text: str, min_count: int = 20) -> CharTokenizer:
        counts: dict[str, int] = {}
        for c in text:
            counts[c] = counts.get(c, 0) + 1
        return cls("".join(sorted(c for c, n in counts.items() if n >= min_count)))

    @property
    def vocab(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> np.ndarray:
        return np.array([self.ids.get(c, 0) for c in text], np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 1] if 0 < i <= len(self.chars) else "?" for i in ids)


def load_data(max_bytes: int, held_out: float = 0.05) -> tuple[CharTokenizer, np.ndarray, np.ndarray]:
    """(tokenizer, train ids, held-out ids): the last ``held_out`` of the text (the last files) is held out."""
    text = "\n".join(stdlib_text(max_bytes))
    cut = int(len(text) * (1 - held_out))
    train, val = text[:cut], text[cut:]
    tok = CharTokenizer.fit(train)
    return tok, tok.encode(train), tok.encode(val)


def batch_at(ids: np.ndarray, step: int, batch: int, seq: int, seed: int) -> np.ndarray:
    """int32 ``[batch, seq + 1]`` windows at offsets drawn from (seed, step): a resumed run sees the
    batches it would have seen."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(ids) - seq - 1, size=batch)
    return np.stack([ids[s : s + seq + 1] for s in starts])


# ---------------------------------------------------------------------------------------------
# The model.


class Attention(nnx.Module):
    """Causal multi-head self-attention (``jax.nn.dot_product_attention``) on ``[B, S, dim]``, queries and
    keys rotated by their positions (RoPE over the whole head dim, 64 or 128)."""

    def __init__(self, dim: int, heads: int, max_positions: int, *, dtype: Any, impl=None, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(2, 3))
        self.wqkv = param(rngs, init, (dim, 3, heads, dim // heads), jnp.float32, (EMBED, None, HEADS, HEAD_DIM))
        self.wo = param(rngs, nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), (heads, dim // heads, dim), jnp.float32,
                        (HEADS, HEAD_DIM, EMBED))  # fmt: skip
        self.rope = RotaryEmbedding(dim // heads, max_positions, impl=impl)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = jnp.unstack(jnp.einsum("bsd,dthk->tbshk", x, self.wqkv[...].astype(self.dtype)))
        q, k = self.rope(q, k)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return jnp.einsum("bshk,hkd->bsd", o, self.wo[...].astype(self.dtype))


def engram_gate(c: Config, streams: int, *, impl, rngs: nnx.Rngs) -> EngramGate:
    return EngramGate(c.dim, streams, c.engram_vocab, c.engram_dim, impl=impl, rngs=rngs)


class Block(nnx.Module):
    """[Engram ->] attention -> MoE, pre-norm, on a ``[B, S, dim]`` residual stream."""

    def __init__(self, c: Config, *, impl, dtype: Any, engram: bool = False, fp8: bool = False, rngs: nnx.Rngs):
        self.engram = engram_gate(c, 1, impl=impl, rngs=rngs) if engram else None
        self.attn_norm = RMSNorm(c.dim, impl=impl, rngs=rngs)
        self.attn = Attention(c.dim, c.heads, c.seq, dtype=dtype, impl=impl, rngs=rngs)
        self.ffn_norm = RMSNorm(c.dim, impl=impl, rngs=rngs)
        self.moe = MoE(c.dim, c.ffn, c.experts, c.topk, num_shared_experts=1, alignment=c.alignment, dtype=dtype, fp8=fp8, impl=impl, rngs=rngs)

    def __call__(self, x: jax.Array, residual: jax.Array | None, ngrams: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(block output, residual stream, aux loss)``; the residual add is fused into the norms."""
        if self.engram is not None:  # the gate adds its branch to the stream itself (one stream: hc = 1)
            stream = x if residual is None else x + residual
            x, residual = self.engram(stream[..., None, :], ngrams)[..., 0, :], None
        h, residual = self.attn_norm(x, residual) if residual is not None else (self.attn_norm(x), x)
        h, residual = self.ffn_norm(self.attn(h), residual)
        y, aux = self.moe(h)
        return y, residual, aux


class HyperBlock(nnx.Module):
    """The same block on an mHC stream ``[B, S, n, dim]``: [Engram on the n streams ->] attention and MoE,
    each with its pre-norm inside a ``HyperConnection``."""

    def __init__(self, c: Config, n: int, *, impl, dtype: Any, engram: bool = False, fp8: bool = False, rngs: nnx.Rngs):
        self.engram = engram_gate(c, n, impl=impl, rngs=rngs) if engram else None
        attn = nnx.Sequential(RMSNorm(c.dim, impl=impl, rngs=rngs), Attention(c.dim, c.heads, c.seq, dtype=dtype, impl=impl, rngs=rngs))
        experts = MoE(c.dim, c.ffn, c.experts, c.topk, num_shared_experts=1, alignment=c.alignment, dtype=dtype, fp8=fp8, impl=impl, rngs=rngs)
        moe = nnx.Sequential(RMSNorm(c.dim, impl=impl, rngs=rngs), experts)
        self.attn = HyperConnection(attn, c.dim, n, sinkhorn_repeat=c.mhc_sinkhorn_repeat, impl=impl, rngs=rngs)
        self.moe = HyperConnection(moe, c.dim, n, sinkhorn_repeat=c.mhc_sinkhorn_repeat, impl=impl, rngs=rngs)

    def __call__(self, stream: jax.Array, ngrams: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """``(new stream, aux loss)``."""
        if self.engram is not None:
            stream = self.engram(stream, ngrams)
        return self.moe(self.attn(stream))


class Transformer(nnx.Module):
    """Token ids ``[B, S]`` -> float32 logits ``[B, S, vocab]`` and the summed load-balancing loss.

    ``mhc``: 0 for the plain residual stream, else its number of mHC streams; ``engram``: Engram gates
    in the blocks ``c.engram_layers``; ``fp8``: the MoE layers' matmuls in FP8 (``MoE(fp8=True)``)."""

    def __init__(self, c: Config, *, impl=None, dtype: Any = jnp.bfloat16, mhc: int = 0, engram: bool = False, fp8: bool = False,
                 rngs: nnx.Rngs):  # fmt: skip
        if engram and not all(0 <= i < c.layers for i in c.engram_layers):
            raise ValueError(f"engram_layers {c.engram_layers} must name blocks of the {c.layers}-layer model")
        gated = set(c.engram_layers) if engram else set()
        self.embed = param(rngs, nnx.initializers.normal(1.0), (c.vocab, c.dim), jnp.float32, (VOCAB, EMBED))
        if mhc:
            blocks = [HyperBlock(c, mhc, impl=impl, dtype=dtype, engram=i in gated, fp8=fp8, rngs=rngs) for i in range(c.layers)]
        else:
            blocks = [Block(c, impl=impl, dtype=dtype, engram=i in gated, fp8=fp8, rngs=rngs) for i in range(c.layers)]
        self.blocks = nnx.List(blocks)
        self.head = HyperHead(c.dim, mhc, impl=impl, rngs=rngs) if mhc else None
        self.norm = RMSNorm(c.dim, impl=impl, rngs=rngs)
        self.unembed = param(rngs, nnx.initializers.normal(c.dim**-0.5), (c.dim, c.vocab), jnp.float32, (EMBED, VOCAB))
        self.dtype, self.mhc, self.impl = dtype, mhc, impl
        self.ngram = len(c.engram_vocab) + 1 if engram else 0  # the n-gram size the gates hash

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = self.embed[...][tokens].astype(self.dtype)
        ngrams = ngram_token_ids(tokens, self.ngram) if self.ngram else None
        aux = jnp.float32(0)
        if self.mhc:
            stream = hyper_expand(x, self.mhc, impl=self.impl)
            for block in self.blocks:
                stream, a = block(stream, ngrams)
                aux = aux + a
            h = self.norm(self.head(stream))
        else:
            residual = None
            for block in self.blocks:
                x, residual, a = block(x, residual, ngrams)
                aux = aux + a
            h, _ = self.norm(x, residual)
        return jnp.einsum("bsd,dv->bsv", h, self.unembed[...].astype(self.dtype)).astype(jnp.float32), aux


def cross_entropy(model: Transformer, batch: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits, aux = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(), aux


def optimizer_for(c: Config, engram: bool = False, impl=None) -> optax.GradientTransformation:
    """AdamW (clipped, warmup + cosine); with ``engram``, the Engram tables take Sinkhorn momentum on the
    same schedule instead (``optax.multi_transform``, tables labelled by ``jax_tilek.nnx.is_table``)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, c.lr, max(1, c.steps // 20), c.steps, c.lr / 10)
    adamw = optax.adamw(schedule, b2=0.95, weight_decay=0.1)
    if not engram:
        return optax.chain(optax.clip_by_global_norm(1.0), adamw)

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: "table" if is_table(path) else "rest", params)

    split = optax.multi_transform({"table": sinkhorn_momentum(schedule, impl=impl), "rest": adamw}, labels)
    return optax.chain(optax.clip_by_global_norm(1.0), split)


def make_fns(c: Config, impl=None, seed: int = 0, mhc: int = 0, engram: bool = False, fp8: bool = False):
    """``(graphdef, state, train_step, eval_step, decode)``: pure jitted functions of the model and
    optimizer state (an ``nnx.State``), so they also serve ``jax_tilek.precompile``."""
    model = Transformer(c, impl=impl, mhc=mhc, engram=engram, fp8=fp8, rngs=nnx.Rngs(seed))
    tx = optimizer_for(c, engram, impl)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def loss_fn(model, batch):
        ce, aux = cross_entropy(model, batch)
        return ce + c.aux_coef * aux, (ce, aux)

    @jax.jit
    def train_step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        (_, (ce, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), {"loss": ce, "aux": aux}

    @jax.jit
    def eval_step(state, batch):
        model, _ = nnx.merge(graphdef, state)
        return cross_entropy(model, batch)[0]

    @jax.jit
    def decode(state, prompt, length, key):
        """Samples tokens ``length .. seq-1`` of ``prompt`` (int32 ``[seq]``) at temperature 0.8."""
        model, _ = nnx.merge(graphdef, state)

        def body(i, carry):
            tokens, key = carry
            key, sub = jax.random.split(key)
            logits = model(tokens[None])[0][0, i - 1]
            return tokens.at[i].set(jax.random.categorical(sub, logits / 0.8).astype(jnp.int32)), key

        return jax.lax.fori_loop(length, prompt.shape[0], body, (prompt, key))[0]

    return graphdef, state, train_step, eval_step, decode


# ---------------------------------------------------------------------------------------------
# The job.


def plot(out: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [r for r in rows if "loss" in r]
    held = [r for r in rows if "eval_loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    ax.plot([r["step"] for r in held], [r["eval_loss"] for r in held], "o-", label="held-out")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/char)", title="train_moe.py")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=120)
    plt.close(fig)


def implementation(impl) -> str:
    """What ran: the kernels, or the pure-JAX references."""
    impl = impl or jax.config.jax_tilek_impl
    if impl == "xla" or (impl is None and not jax_tilek.kernels_available()):
        return f"xla reference ({jax.default_backend()})"
    return "tilelang kernels"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=("tilelang", "xla"), default=None, help="default: kernels on Hopper/Blackwell, references elsewhere")
    p.add_argument("--fp8", action="store_true", help="the MoE layers' matmuls in FP8, forward and backward (e4m3, DeepSeek's block scales)")
    p.add_argument("--steps", type=int, default=None, help="train up to this step (default: the model's schedule length)")
    p.add_argument("--model", choices=tuple(CONFIGS), default="tiny")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: the model's)")
    p.add_argument("--mhc", type=int, nargs="?", const=4, default=0, metavar="N", help="mHC residual streams (N, default 4 when given)")
    p.add_argument("--engram", action="store_true", help="Engram gates (Config.engram_layers), tables trained by Sinkhorn momentum")
    p.add_argument("--precompile", metavar="ARCH", help="compile this job's kernels for ARCH (e.g. sm_90a) into the cache and exit")
    p.add_argument("--out", default="train_moe_out", help="metrics.jsonl, loss.png, vocab.json and checkpoints (resumed from)")
    p.add_argument("--data-bytes", type=int, default=3_000_000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", metavar="DIR", help="after training, trace three more steps (not saved) into DIR (jax.profiler; summarise with benchmarks.step_profile)")
    args = p.parse_args(argv)

    tok, train_ids, val_ids = load_data(args.data_bytes)
    c = dataclasses.replace(CONFIGS[args.model], vocab=tok.vocab)
    c = dataclasses.replace(c, batch=args.batch or c.batch)
    stop = args.steps or c.steps
    graphdef, state, train_step, eval_step, decode = make_fns(c, args.impl, args.seed, mhc=args.mhc, engram=args.engram, fp8=args.fp8)
    batch_struct = jax.ShapeDtypeStruct((c.batch, c.seq + 1), jnp.int32)

    if args.precompile:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        seq = jax.ShapeDtypeStruct((c.seq,), jnp.int32)
        used = jax_tilek.precompile(train_step, abstract, batch_struct, arch=args.precompile)
        used += jax_tilek.precompile(eval_step, abstract, batch_struct, arch=args.precompile)
        used += jax_tilek.precompile(decode, abstract, seq, jnp.int32(1), jax.random.key(0), arch=args.precompile)
        kernels = sorted({(str(getattr(k, "name", k)), str(params)) for k, params, *_ in used})
        print(f"{len(kernels)} kernel configurations for {args.precompile} in the cache:")
        for name, params in kernels:
            print(f"  {name} {params}")
        return {"kernels": len(kernels)}

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vocab.json"), "w") as f:
        json.dump({"chars": tok.chars}, f)
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(args.out, "ckpt")), options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start = manager.latest_step() or 0
    if start:
        state = manager.restore(start, args=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)))
        stop = max(stop, start)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    rows = []
    if start and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            rows = [r for r in map(json.loads, f) if r["step"] <= start]
    with open(metrics_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    val_batches = [batch_at(val_ids, i, c.batch, c.seq, seed=10_000 + args.seed) for i in range(4)]

    def evaluate(step: int) -> float:
        loss = float(np.mean([eval_step(state, b) for b in val_batches]))
        record({"step": step, "eval_loss": loss})
        return loss

    def record(row: dict) -> None:
        rows.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    ran = implementation(args.impl)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)))
    variant = "".join((f" + mHC (n = {args.mhc})" if args.mhc else "", " + Engram" if args.engram else "", " + FP8 MoE" if args.fp8 else ""))
    print(f"model {args.model}{variant}: {params / 1e6:.2f}M parameters, vocab {c.vocab} (ln {math.log(c.vocab):.2f}), "
          f"{len(train_ids) / 1e6:.2f}M train / {len(val_ids) / 1e6:.2f}M held-out chars; {ran}")  # fmt: skip
    if start:
        print(f"resumed from {args.out}/ckpt step {start}")
    else:
        print(f"step 0: held-out loss {evaluate(0):.3f}")
    tokens_per_step = c.batch * c.seq
    bar = tqdm(range(start, stop), initial=start, total=stop, desc=ran, dynamic_ncols=True)
    rate, t0 = None, None
    for step in bar:
        state, m = train_step(state, batch_at(train_ids, step, c.batch, c.seq, args.seed))
        if step == start or (step + 1) % 10 == 0 or step + 1 == stop:
            loss, aux = float(m["loss"]), float(m["aux"])  # syncs
            row = {"step": step + 1, "loss": loss, "aux": aux / c.layers}
            if t0 is None:  # the rate counts from the first step's end: compiling is not training
                t0, counted_from = time.perf_counter(), step + 1
            elif step + 1 > counted_from:
                rate = row["tokens_per_s"] = (step + 1 - counted_from) * tokens_per_step / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss:.3f}", aux=f"{aux / c.layers:.3f}", tok_s=f"{rate:,.0f}")
            record(row)
        if (step + 1) % args.eval_every == 0 and step + 1 < stop:
            bar.write(f"step {step + 1}: held-out loss {evaluate(step + 1):.3f}")
    bar.close()
    final_eval = evaluate(stop)
    if stop > start:
        manager.save(stop, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    plot(args.out, rows)

    prompt_text = "def "
    prompt = np.zeros((c.seq,), np.int32)
    prompt[: len(prompt_text)] = tok.encode(prompt_text)
    sample = decode(state, jnp.asarray(prompt), len(prompt_text), jax.random.key(args.seed))
    text = tok.decode(np.asarray(sample)[: min(c.seq, 160)])
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    train_losses = list(losses.values())
    print(f"held-out loss {final_eval:.3f} (train {train_losses[0] if train_losses else float('nan'):.3f} -> "
          f"{train_losses[-1] if train_losses else float('nan'):.3f}); wrote {args.out}/metrics.jsonl, loss.png, ckpt/{stop}")  # fmt: skip
    if rate:
        print(f"{rate:,.0f} tokens/s after the first step ({ran})")
    print("sample:\n" + text)
    if args.profile and stop > start:
        batches = [batch_at(train_ids, stop + i, c.batch, c.seq, args.seed) for i in range(3)]
        state, _ = train_step(state, batches[0])  # warm: the trace holds steady-state steps only
        jax.block_until_ready(state)
        with jax.profiler.trace(args.profile):
            for b in batches:
                state, m = train_step(state, b)
            jax.block_until_ready((state, m))
        print(f"traced 3 steps into {args.profile}")
    return {"eval_loss": final_eval, "losses": losses, "start": start, "sample": text, "tokens_per_s": rate}


if __name__ == "__main__":
    main()
