"""Optimizer step time on a K2-shaped parameter tree: MuonClip vs Muon vs optax.contrib.muon vs AdamW.

    .venv/bin/python benchmarks/optim_step.py [--preset small] [--d-model 512] [--rounds 7]

Builds the real parameter tree (and metadata) of a model preset from the abstract
model, jits one `update + apply_updates` per optimizer, and times them
interleaved round by round so all see the same machine load; prints the median
step time and the ratio to plain Muon, all from one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from k2jax.config import OptimConfig, get_preset, k2_family
from k2jax.model.count import abstract_model
from k2jax.optim import muonclip
from k2jax.optim.muon import dimension_numbers, muon_or_adamw
from k2jax.params import is_info, param_info


def _tree(preset: str, d_model: int | None):
    cfg = get_preset(preset)
    moe = cfg.moe
    if d_model:  # the same K2 family shape at another width
        cfg = k2_family(d_model=d_model, num_layers=cfg.num_layers, num_heads=cfg.attention.num_heads,
                        sparsity=moe.num_experts // moe.experts_per_token, experts_per_token=moe.experts_per_token,
                        vocab_size=cfg.vocab_size)
    state = nnx.state(abstract_model(cfg), nnx.Param)
    infos = param_info(state)
    shapes = nnx.to_pure_dict(state)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(shapes))))
    params = jax.tree.map(lambda s: jax.random.normal(next(keys), s.shape, jnp.float32) * 0.02, shapes)
    return params, infos


def _stats(infos, params):
    """Max logits per stats key, (L, H), half of the heads above tau = 100."""
    out = {}
    for info, p in zip(jax.tree.leaves(infos, is_leaf=is_info), jax.tree.leaves(params)):
        if info.qk is not None and "kv_heads" not in info.axes:
            shape = tuple(p.shape[i] for i in info.layer_axes) + (p.shape[info.head_axis],)
            out[info.stats_key] = jnp.where(jnp.arange(shape[-1]) % 2 == 0, 150.0, 50.0) * jnp.ones(shape)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--d-model", type=int, default=None, help="rescale the preset's width")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    params, infos = _tree(args.preset, args.d_model)
    grads = jax.tree.map(lambda p: p * 0.1 + 0.01, params)
    stats = _stats(infos, params)
    dims = jax.tree.map(lambda i: dimension_numbers(i) if i.kind == "matrix" else None, infos, is_leaf=is_info)
    txs = {
        "muonclip": muonclip(1e-3, infos),
        "muon": muonclip(1e-3, infos, clip=False),
        "optax.contrib.muon": optax.contrib.muon(1e-3, muon_weight_dimension_numbers=dims, consistent_rms=0.2,
                                                 weight_decay=0.1, adam_weight_decay=0.1, adam_b2=0.95),
        "adamw": muon_or_adamw(1e-3, infos, OptimConfig(), use_muon=False),
    }
    steps = {}
    for name, tx in txs.items():
        extra = {"attn_max_logits": stats} if name == "muonclip" else {}

        @jax.jit
        def step(p, s, tx=tx, extra=extra):
            u, s = tx.update(grads, s, p, **extra)
            return optax.apply_updates(p, u), s

        state = tx.init(params)
        jax.block_until_ready(step(params, state))  # compile
        steps[name] = (step, state)
    times = {name: [] for name in txs}
    for _ in range(args.rounds):
        for name, (step, state) in steps.items():
            p = params
            start = time.perf_counter()
            for _ in range(args.iters):
                p, state = step(p, state)
            jax.block_until_ready(p)
            times[name].append((time.perf_counter() - start) / args.iters)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"preset={args.preset} d_model={args.d_model or 'preset'} params={n:,} device={jax.devices()[0].device_kind} rounds={args.rounds}")
    for name, t in median.items():
        print(f"  {name:20s} {t * 1e3:8.2f} ms/step   {t / median['muon']:.3f}x muon")


if __name__ == "__main__":
    main()
