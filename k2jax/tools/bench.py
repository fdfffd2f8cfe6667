"""Whole-train-step benchmark: MuonClip against plain Muon and AdamW on the same model and batch,
or any config key's values against each other (`--compare execution.attention_impl=plain,flash`).

Each variant gets its own state and compiled step; steps are then timed round-robin
(one step of each per round) so all see the same machine load, and the medians are
compared as ratios from this one run. Batches are random tokens: the step's cost does not
depend on the text.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import numpy as np

from k2jax.config import Config
from k2jax.model import flops as flops_lib
from k2jax.optim.muon import newton_schulz_flops
from k2jax.parallel.sharding import batch_sharding
from k2jax.train.step import init_train_state, make_train_step

OPTIMIZERS = ("muonclip", "muon", "adamw")


def _random_batch(cfg: Config, seed: int = 0) -> dict:
    b, t = cfg.train.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(seed).integers(3, cfg.model.vocab_size, (b, t + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}


def _peak_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def optimizer_variants(cfg: Config, optimizers=OPTIMIZERS) -> dict[str, Config]:
    """The same run with each optimizer (the default comparison)."""
    return {name: dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, name=name)) for name in optimizers}


def bench(variants: dict[str, Config], *, steps: int = 10, warmup: int = 2,
          profile_dir: str | None = None) -> list[dict]:
    """One row per variant: median step time, tokens/s, model FLOPs/token, MFU (where the
    device's peak is known), compile time, peak device memory, and the first variant's step
    time over this one's (for MuonClip first: its slowdown relative to each). With
    profile_dir, one more step of each variant, after the timed ones, is traced there
    (jax.profiler; open with TensorBoard's profile plugin or Perfetto), each under its name."""
    runs = {}
    for name, run_cfg in variants.items():
        setup, state = init_train_state(run_cfg)
        shape = (run_cfg.train.batch_size, run_cfg.data.seq_len)
        batch = jax.device_put(_random_batch(run_cfg), batch_sharding(setup.mesh, shape))
        step = make_train_step(run_cfg, setup)
        started = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - started
        for _ in range(warmup):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        ns_flops = newton_schulz_flops(setup.infos, state["params"], run_cfg.optim.ns_steps,
                                       use_muon=run_cfg.optim.name != "adamw")
        runs[name] = {"step": step, "state": state, "batch": batch, "times": [], "compile_s": compile_s,
                      "cfg": run_cfg, "ns_flops": ns_flops}
    for _ in range(steps):  # round-robin: every variant sees the same load
        for run in runs.values():
            started = time.perf_counter()
            run["state"], metrics = run["step"](run["state"], run["batch"])
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - started)
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            for name, run in runs.items():
                with jax.profiler.TraceAnnotation(f"train_step:{name}"):
                    run["state"], metrics = run["step"](run["state"], run["batch"])
                    jax.block_until_ready(metrics)
    peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind)
    first = statistics.median(next(iter(runs.values()))["times"])
    rows = []
    for name, run in runs.items():
        cfg = run["cfg"]
        tokens = cfg.train.batch_size * cfg.data.seq_len
        per_token = flops_lib.flops_per_token(cfg.model, cfg.data.seq_len)
        step_s = statistics.median(run["times"])
        rows.append({"variant": name, "step_s": step_s, "tokens_per_s": tokens / step_s,
                     "model_flops_per_token": per_token["total"], "attention_flops_per_token": per_token["attention"],
                     "mfu": flops_lib.mfu(tokens / step_s, per_token["total"], jax.device_count(), peak) if peak else None,
                     "compile_s": run["compile_s"], "ratio": first / step_s,
                     "newton_schulz_flops": run["ns_flops"],
                     "newton_schulz_fraction": flops_lib.newton_schulz_fraction(run["ns_flops"], cfg)})
    rows[-1]["peak_memory_bytes"] = _peak_memory_bytes()  # the process's peak over all variants
    return rows


def format_table(rows: list[dict], cfg: Config) -> str:
    device = jax.devices()[0]
    lines = [f"{cfg.model.num_layers} layers, d_model {cfg.model.d_model}, {cfg.model.moe.num_experts} experts; "
             f"batch {cfg.train.batch_size} x {cfg.data.seq_len}; {jax.device_count()} x {device.device_kind}",
             f"model FLOPs/token {rows[0]['model_flops_per_token']:.3e} "
             f"(attention {rows[0]['attention_flops_per_token']:.3e})",
             "", f"{'variant':16s} {'step ms':>9s} {'tokens/s':>11s} {'MFU':>7s} {'compile s':>10s} "
             f"{rows[0]['variant'] + '/this':>14s}"]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(f"{r['variant']:16s} {r['step_s'] * 1e3:9.1f} {r['tokens_per_s']:11,.0f} {mfu:>7s} "
                     f"{r['compile_s']:10.1f} {r['ratio']:13.3f}x")
    ns = next((r for r in rows if r["newton_schulz_flops"]), None)
    if ns:
        lines.append(f"Newton-Schulz FLOPs/step {ns['newton_schulz_flops']:.3e} = "
                     f"{ns['newton_schulz_fraction']:.1%} of the step's model FLOPs")
    peak = rows[-1].get("peak_memory_bytes")
    lines.append(f"peak device memory: {peak / 2**30:.2f} GiB" if peak else "peak device memory: n/a on this backend")
    return "\n".join(lines)
