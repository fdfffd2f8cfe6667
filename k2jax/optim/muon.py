"""Muon for matrices and AdamW for the rest, split by parameter metadata.

Newton-Schulz and momentum come from optax.contrib.scale_by_muon; dimension
numbers are derived from each parameter's ParamInfo (fan-in axes -> reduction,
the rest -> output, stacked "layers"/"experts" axes -> batch, so every expert
and every scanned layer is orthogonalised as its own matrix). optax iterates in
the momentum's dtype (float32 with float32 master weights); with ns_dtype="bfloat16"
(K2's choice) the iterations run in bfloat16 instead, through optax's own
Newton-Schulz function. On a mesh of several devices, `owner.py` orthogonalises
each matrix once, on its owner device, instead of leaving the partitioning to GSPMD.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from k2jax.config import OptimConfig
from k2jax.optim.owner import is_masked, matrix_flops, newton_schulz, owner_newton_schulz_tree
from k2jax.params import ParamInfo, is_info

MUON, ADAMW, ADAMW_NO_DECAY = "muon", "adamw", "adamw_no_decay"
_DECAYED_KINDS = ("embedding", "unembedding")  # norms, router and biases are not decayed


def rule_of(info: ParamInfo, use_muon: bool = True) -> str:
    if info.kind == "matrix":
        return MUON if use_muon else ADAMW
    return ADAMW if info.kind in _DECAYED_KINDS else ADAMW_NO_DECAY


def labels(infos, use_muon: bool = True):
    return jax.tree.map(lambda i: rule_of(i, use_muon), infos, is_leaf=is_info)


def dimension_numbers(info: ParamInfo) -> MuonDimensionNumbers:
    return MuonDimensionNumbers(reduction_axis=info.reduction_axes, output_axis=info.output_axes)


def matrix_shape(info: ParamInfo, shape) -> tuple[int, int]:
    """(A, B) = (fan-in, fan-out) of each matrix slice of a parameter."""
    return (math.prod(shape[i] for i in info.reduction_axes), math.prod(shape[i] for i in info.output_axes))


def newton_schulz_flops(infos, shapes, steps: int = OptimConfig.ns_steps, use_muon: bool = True) -> float:
    """FLOPs of the Newton-Schulz iterations in one Muon update, summed over every Muon matrix.

    infos: ParamInfo tree; shapes: a matching tree of arrays or ShapeDtypeStructs; use_muon
    False (AdamW everywhere) gives 0. Per (A, B) matrix and step: `owner.matrix_flops`.
    """
    total = 0.0
    for info, x in zip(jax.tree.leaves(infos, is_leaf=is_info), jax.tree.leaves(shapes)):
        if rule_of(info, use_muon) != MUON:
            continue
        a, b = matrix_shape(info, x.shape)
        count = math.prod(x.shape) // (a * b)  # stacked layers / experts
        total += count * steps * matrix_flops(a, b)
    return total


def scale_by_rms_match(infos, rms_scale: float) -> optax.GradientTransformation:
    """Multiply each orthogonalised update by rms_scale * sqrt(max(A, B)) (K2 / Moonlight):
    an orthogonal A x B matrix has RMS 1/sqrt(max(A, B)), so updates get RMS ~rms_scale,
    like AdamW's, and AdamW learning rates and weight decay carry over."""

    def update_fn(updates, state, params=None):
        del params

        def scale(u, info):
            if isinstance(u, optax.MaskedNode):
                return u
            return u * (rms_scale * math.sqrt(max(matrix_shape(info, u.shape))))

        return jax.tree.map(scale, updates, infos, is_leaf=is_masked), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def newton_schulz_tree(infos, ns_coeffs, ns_steps: int, dtype):
    """updates -> updates: each Muon update (MaskedNode elsewhere) orthogonalised with Newton-Schulz
    computed in `dtype`, one matrix per slice of its dimension numbers, and cast back."""
    def orthogonalise(u, info):
        return u if is_masked(u) else newton_schulz(u, dimension_numbers(info), ns_coeffs, ns_steps, dtype)

    return lambda updates: jax.tree.map(orthogonalise, updates, infos, is_leaf=is_masked)


def scale_by_muon_with(orthogonalise, **muon_kwargs) -> optax.GradientTransformation:
    """optax's Muon momentum and normalisation (scale_by_muon with no iterations), then
    `orthogonalise(updates)`. The state is optax's MuonState whichever orthogonalisation follows,
    so checkpoints move between meshes and iteration dtypes."""
    muon = scale_by_muon(ns_steps=0, **muon_kwargs)

    def update_fn(updates, state, params=None):
        updates, state = muon.update(updates, state, params)
        return orthogonalise(updates), state

    return optax.GradientTransformation(muon.init, update_fn)


def muon_or_adamw(learning_rate, infos, cfg: OptimConfig, use_muon=True, *, adam_learning_rate=None,
                  owner_mesh=None) -> optax.GradientTransformation:
    """optax.partition of Muon (matrices) and AdamW (everything else, or everything if not use_muon),
    with cfg's hyper-parameters. learning_rate, adam_learning_rate: numbers or schedules (make_optimizer
    builds them from cfg's rate and schedule fields); adam_learning_rate None: cfg.adam_learning_rate,
    else learning_rate.
    cfg.ns_dtype: "float32" (optax's iterations) or "bfloat16" (optax's momentum and normalisation,
    then the iterations in bfloat16). owner_mesh: a mesh of several devices on which each matrix
    is orthogonalised once, by its owner device (`owner.py`); None: optax's path as is (one
    device, or GSPMD partitioning it)."""
    adam_lr = next(lr for lr in (adam_learning_rate, cfg.adam_learning_rate, learning_rate) if lr is not None)
    label_tree = labels(infos, use_muon)

    def masked_dim_nums(updates):  # same structure as the muon partition (MaskedNode elsewhere)
        return jax.tree.map(lambda u, i: u if isinstance(u, optax.MaskedNode) else dimension_numbers(i),
                            updates, infos, is_leaf=lambda x: isinstance(x, optax.MaskedNode))

    def adam(wd):
        return optax.adamw(adam_lr, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, weight_decay=wd)

    transforms = {ADAMW: adam(cfg.weight_decay), ADAMW_NO_DECAY: adam(0.0)}
    if use_muon:
        muon_kwargs = dict(ns_coeffs=cfg.ns_coeffs, beta=cfg.momentum, nesterov=cfg.nesterov,
                           weight_dimension_numbers=masked_dim_nums)
        dtype = jnp.dtype(cfg.ns_dtype)
        if owner_mesh is not None:
            muon = scale_by_muon_with(
                owner_newton_schulz_tree(infos, owner_mesh, cfg.ns_coeffs, cfg.ns_steps, dtype), **muon_kwargs)
        elif dtype == jnp.float32:  # optax's own iterations
            muon = scale_by_muon(ns_steps=cfg.ns_steps, **muon_kwargs)
        else:
            muon = scale_by_muon_with(newton_schulz_tree(infos, cfg.ns_coeffs, cfg.ns_steps, dtype), **muon_kwargs)
        transforms[MUON] = optax.chain(
            muon,
            scale_by_rms_match(infos, cfg.rms_scale),
            optax.add_decayed_weights(cfg.weight_decay),
            optax.scale_by_learning_rate(learning_rate),
        )
    present = set(jax.tree.leaves(label_tree))
    return optax.partition({k: v for k, v in transforms.items() if k in present}, label_tree)

