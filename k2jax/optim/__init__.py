"""MuonClip and friends as optax transformations driven by parameter metadata.

    tx = muonclip(learning_rate, param_info(state))          # any optax code; OptimConfig's hyper-parameters
    updates, opt_state = tx.update(grads, opt_state, params, attn_max_logits=stats.max_logits)

`make_optimizer(OptimConfig, infos, total_steps)` builds "muonclip", "muon" or
"adamw" with gradient clipping and the schedule, all accepting the same
`attn_max_logits` keyword so the train step never changes.
"""

from __future__ import annotations

import jax
import optax

from k2jax.config import OptimConfig
from k2jax.optim.muon import MUON, muon_or_adamw, rule_of
from k2jax.optim.qk_clip import QKClipState, qk_clip
from k2jax.optim.schedules import make_schedule
from k2jax.parallel.sharding import spec_text
from k2jax.params import is_info

__all__ = ["muonclip", "make_optimizer", "make_schedule", "qk_clip", "qk_clip_metrics", "describe"]


def muonclip(learning_rate, param_infos, cfg: OptimConfig = OptimConfig(), *, adam_learning_rate=None, clip=True,
             owner_mesh=None) -> optax.GradientTransformationExtraArgs:
    """Muon (matrices) + AdamW (the rest), then QK-Clip on query/key projections (if clip), with
    cfg's hyper-parameters; learning rates and owner_mesh as in `muon_or_adamw`."""
    base = muon_or_adamw(learning_rate, param_infos, cfg, adam_learning_rate=adam_learning_rate,
                         owner_mesh=owner_mesh)
    parts = [base, qk_clip(param_infos, cfg.qk_clip_tau, cfg.qk_clip_alpha)] if clip else [base]
    return optax.chain(*parts)


def make_optimizer(cfg: OptimConfig, param_infos, total_steps: int, mesh=None) -> optax.GradientTransformationExtraArgs:
    """Gradient clipping, then the configured optimizer on the configured schedule. On a mesh of
    several devices, optim.muon_sharding "owner" gives every Muon matrix one owner device."""
    lr = make_schedule(cfg, total_steps)
    adam_lr = None if cfg.adam_learning_rate is None else make_schedule(cfg, total_steps, cfg.adam_learning_rate)
    if cfg.name == "adamw":
        tx = muon_or_adamw(lr, param_infos, cfg, use_muon=False, adam_learning_rate=adam_lr)
    else:
        owner = cfg.muon_sharding == "owner" and mesh is not None and mesh.size > 1
        tx = muonclip(lr, param_infos, cfg, adam_learning_rate=adam_lr, clip=cfg.name == "muonclip",
                      owner_mesh=mesh if owner else None)
    if cfg.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return optax.with_extra_args_support(tx)


def qk_clip_metrics(opt_state) -> dict:
    """{"clipped_heads", "min_gamma"} from the QK-Clip state inside an optimizer state (empty if none)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, QKClipState))
             if isinstance(s, QKClipState)]
    return {"clipped_heads": found[0].clipped_heads, "min_gamma": found[0].min_gamma} if found else {}


def describe(param_infos, optimizer: str = "muonclip", shardings=None) -> list[tuple[str, ...]]:
    """(path, logical axes, update rule, qk-clip role[, placement]) per parameter, for `k2jax info
    --params`; the placement (mesh axes per dimension) when given the parameters' shardings
    (k2jax.parallel.sharding.param_shardings)."""
    flat = jax.tree_util.tree_flatten_with_path(param_infos, is_leaf=is_info)[0]
    if shardings is None:
        placements = [()] * len(flat)
    else:
        placements = [(spec_text(s.spec),) for s in jax.tree.leaves(shardings)]
    rows = []
    for (path, info), placement in zip(flat, placements):
        rule = rule_of(info, use_muon=optimizer != "adamw")
        if rule == MUON:
            rule = f"muon(in={','.join(info.axes[i] for i in info.reduction_axes)})"
        clip = "-"
        if optimizer == "muonclip" and info.qk:
            clip = "+".join(f"{role}:{w}" for role, w in info.qk) + f" @{info.stats_key}"
        path_text = "/".join(str(getattr(k, "key", k)) for k in path)
        rows.append((path_text, "(" + ",".join(info.axes) + ")", rule, clip, *placement))
    return rows
