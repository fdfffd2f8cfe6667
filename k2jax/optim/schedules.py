"""Learning-rate schedules: warmup + cosine, WSD (warmup, stable, decay) as K2 used, constant."""

from __future__ import annotations

import optax

from k2jax.config import OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int, peak: float | None = None) -> optax.Schedule:
    """Step -> learning rate. `peak` defaults to cfg.learning_rate."""
    peak = cfg.learning_rate if peak is None else peak
    floor = peak * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, total_steps)
    ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if cfg.schedule == "constant":
        rest = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        rest = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=cfg.min_lr_ratio)
    else:  # wsd: hold the peak, then cosine-decay over the last decay_fraction of the run (K2: 2e-4 -> 2e-5)
        decay = max(int(round(total_steps * cfg.decay_fraction)), 1)
        stable = max(total_steps - warmup - decay, 0)
        rest = optax.join_schedules(
            [optax.constant_schedule(peak), optax.cosine_decay_schedule(peak, decay, alpha=floor / peak if peak else 0)],
            [stable])
    return optax.join_schedules([ramp, rest], [warmup]) if warmup else rest
