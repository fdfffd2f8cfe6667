"""Attention forward + backward: the plain path against the Pallas flash kernel at several tile sizes.

    .venv/bin/python benchmarks/attention.py                          # GPU: 4 x 2048, 16 heads, MLA dims
    .venv/bin/python benchmarks/attention.py --blocks 64x64,128x64,128x128

Times jitted value-and-grad of sum(out * probe) for each variant round-robin (median of
rounds) and prints milliseconds, the ratio to the plain path, and the largest difference
of the per-head max logits from the plain path's (the QK-Clip statistic must agree). On
GPU it also times jax.nn.dot_product_attention(implementation="cudnn") as the speed to
beat (it yields no max logits). On CPU the kernel runs in Pallas interpret mode, so the
default sizes shrink and only correctness means anything there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from k2jax.model.attention import attend, attention_mask
from k2jax.kernels.flash_attention import flash_attend


def _timed(fn, args, rounds_out: list):
    started = time.perf_counter()
    jax.block_until_ready(fn(*args))
    rounds_out.append(time.perf_counter() - started)


def main():
    on_gpu = jax.default_backend() == "gpu"
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4 if on_gpu else 1)
    parser.add_argument("--seq", type=int, default=2048 if on_gpu else 128)
    parser.add_argument("--heads", type=int, default=16 if on_gpu else 2)
    parser.add_argument("--qk-dim", type=int, default=192, help="MLA: 128 nope + 64 rope")
    parser.add_argument("--v-dim", type=int, default=128)
    parser.add_argument("--blocks", default="64x64,128x64,128x128" if on_gpu else "32x32",
                        help="comma-separated QUERYxKEY tile sizes for the flash kernel")
    parser.add_argument("--rounds", type=int, default=10 if on_gpu else 2)
    args = parser.parse_args()

    b, t, h = args.batch, args.seq, args.heads
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, h, args.qk_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, h, args.qk_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, h, args.v_dim), jnp.bfloat16)
    probe = jax.random.normal(keys[3], (b, t, h, args.v_dim), jnp.bfloat16)
    segments = jnp.ones((b, t), jnp.int32)
    scale = args.qk_dim ** -0.5

    variants = {"plain": lambda q, k, v: attend(q, k, v, attention_mask(segments), scale)}
    for spec in args.blocks.split(","):
        bq, bk = (int(n) for n in spec.split("x"))
        variants[f"flash {bq}x{bk}"] = (lambda bq, bk: lambda q, k, v: flash_attend(
            q, k, v, segments, scale, block_q=bq, block_k=bk))(bq, bk)
    if on_gpu and args.qk_dim == args.v_dim:
        variants["cudnn (no max logit)"] = lambda q, k, v: (jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation="cudnn"), None)

    def train_like(fn):
        def loss(q, k, v):
            out, max_logits = fn(q, k, v)
            return jnp.sum(out.astype(jnp.float32) * probe), max_logits

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    compiled, reference = {}, None
    for name, fn in variants.items():
        compiled[name] = train_like(fn)
        (_, max_logits), _ = jax.block_until_ready(compiled[name](q, k, v))  # compile + warm up
        reference = max_logits if reference is None else reference
        diff = None if max_logits is None else float(jnp.max(jnp.abs(max_logits - reference)))
        compiled[name] = (compiled[name], diff)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (fn, _) in compiled.items():
            _timed(fn, (q, k, v), times[name])

    print(f"B={b} T={t} H={h} qk={args.qk_dim} v={args.v_dim} bf16, fwd+bwd, {jax.devices()[0].device_kind}")
    plain = statistics.median(times["plain"])
    for name, (_, diff) in compiled.items():
        ms = statistics.median(times[name])
        agree = "n/a" if diff is None else f"{diff:.2e}"
        print(f"  {name:22s} {ms * 1e3:9.2f} ms  {ms / plain:6.2f}x plain  max-logit |diff| {agree}")


if __name__ == "__main__":
    main()
