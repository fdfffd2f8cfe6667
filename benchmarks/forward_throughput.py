"""Forward-pass throughput (tokens/s) of a model preset, and the ratios between MoE expert paths.

    .venv/bin/python benchmarks/forward_throughput.py --preset small --batch 16 --seq 128

Times the jitted forward (logits + attention/MoE statistics) after a warm-up,
alternating the dropless dispatch with jax.lax.ragged_dot, the dropless dispatch with
k2jax's tiled grouped matmul, and the capacity path over several rounds so all see the
same machine load, and prints tokens/s for each and its step time over the first's.
"""

from __future__ import annotations

import argparse
import time

import jax
from flax import nnx

from k2jax.config import ExecutionConfig, get_preset, replace
from k2jax.model.transformer import Transformer


def _forward_fn(cfg, execution):
    model = Transformer(cfg, nnx.Rngs(0), execution)
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, tokens):
        logits, stats = nnx.merge(graphdef, state)(tokens)
        return logits, stats

    return lambda tokens: fwd(state, tokens)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    base = get_preset(args.preset)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, base.vocab_size)
    capacity = replace(base, {"moe.dispatch": "capacity"})
    variants = {"ragged_dot": _forward_fn(base, ExecutionConfig(grouped_matmul="ragged_dot")),
                "tiled": _forward_fn(base, ExecutionConfig(grouped_matmul="tiled")),
                "capacity": _forward_fn(capacity, ExecutionConfig())}
    for fn in variants.values():
        jax.block_until_ready(fn(tokens))  # compile + warm up
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(args.iters):
                out = fn(tokens)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / args.iters)
    n_tokens = args.batch * args.seq
    print(f"preset={args.preset} batch={args.batch} seq={args.seq} device={jax.devices()[0].device_kind}")
    best = {name: min(ts) for name, ts in times.items()}
    for name, t in best.items():
        print(f"  {name:10s} forward: {t * 1e3:8.1f} ms/step  {n_tokens / t:10,.0f} tokens/s  "
              f"step time / ragged_dot's: {t / best['ragged_dot']:.2f}x")


if __name__ == "__main__":
    main()
