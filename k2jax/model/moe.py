"""Mixture-of-Experts FFN: DeepSeek-V3 routing, dropless ragged dispatch, capacity dispatch.

Routing is a pure function (`route`); expert compute either sorts token copies by
expert and runs a grouped matmul (dropless, default; k2jax/kernels: `grouped_matmul.py`, and on a
mesh that splits the tokens, under shard_map with explicit collectives, `expert_parallel.py`,
which exchanges token copies over the expert axis when the experts are split over it and
otherwise runs each shard's tokens locally; `select.py` picks) or packs them into
fixed-capacity (E, C, D) buffers with one-hot einsums (the GSPMD expert-parallel
form, which drops overflow).

Balancing (sigmoid router): a per-expert selection bias in a RouterBias variable
that the optimizer never sees, updated by the train step after each step
(`new_router_bias`), either by DeepSeek-V3's sign rule (`bias += rate * sign(mean
load - load)`) or by Quantile Balancing (Kimi K3): the forward pass records, per
expert, a histogram of the bias each token would need to pick it, and the update
sets each bias to the value that would have given every expert k/E of the tokens.
`model.moe.aux_loss_coef` adds a gradient-based balance loss on top (Switch-style for
the softmax router, DeepSeek-V3's sequence-wise one for the sigmoid router).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config import ExecutionConfig, ModelConfig, MoEConfig
from k2jax.kernels.expert_parallel import Experts
from k2jax.kernels.select import expert_dispatch
from k2jax.model.layers import ParamInit, SwiGLU, dtype_of, make_param
from k2jax.model.stats import ForwardStats


class RouterBias(nnx.Variable):
    """Per-expert selection bias (E,) for aux-loss-free load balancing (not trained by gradients)."""


def route(logits, bias, moe: MoEConfig):
    """Router logits (N, E) float32 -> expert ids (N, K) int32, combine weights (N, K) float32."""
    n, e = logits.shape
    k = moe.experts_per_token
    if moe.router == "sigmoid_bias":
        scores = jax.nn.sigmoid(logits)
        choice = scores + bias  # the bias steers selection only, never the combine weights
        groups = choice.reshape(n, moe.num_expert_groups, e // moe.num_expert_groups)
        group_score = jax.lax.top_k(groups, min(2, groups.shape[-1]))[0].sum(-1)  # (N, G)
        top_groups = jax.lax.top_k(group_score, moe.top_groups)[1]
        group_mask = jnp.zeros_like(group_score, bool).at[jnp.arange(n)[:, None], top_groups].set(True)
        allowed = jnp.repeat(group_mask, e // moe.num_expert_groups, axis=1)
        ids = jax.lax.top_k(jnp.where(allowed, choice, -jnp.inf), k)[1]
        weights = jnp.take_along_axis(scores, ids, axis=1)
    else:
        probs = jax.nn.softmax(logits, axis=-1)
        weights, ids = jax.lax.top_k(probs, k)
    if moe.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return ids.astype(jnp.int32), weights * moe.routed_scaling_factor


QB_BINS = 1024  # histogram bins of Quantile Balancing over [min(bias) - 1, max(bias) + 1]


def _bias_range(bias):
    """(lo, hi) (...,) of the bias a token can need: sigmoid scores lie in (0, 1)."""
    return jnp.min(bias, axis=-1) - 1.0, jnp.max(bias, axis=-1) + 1.0


def balance_histogram(scores, bias, vmask, k: int):
    """Quantile Balancing's statistic: (E, QB_BINS) counts of the bias each valid token needs to
    pick each expert, with the other experts' biases as they are: the k-th best biased score among
    the other experts minus the token's score for this one. That score is the (k+1)-th best
    overall for an expert the token picked and the k-th best for one it did not (with the
    (k+1)-th for all, as some implementations do, a fixed skewed router needs about four solves
    to settle; with this, one). Group-limited routing (num_expert_groups > 1) is not modelled.

    scores (N, E) unbiased sigmoid scores, bias (E,), vmask (N,) float32.
    """
    n, e = scores.shape
    top, ids = jax.lax.top_k(scores + bias, k + 1)  # (N, k+1)
    picked = jnp.zeros((n, e), bool).at[jnp.arange(n)[:, None], ids[:, :k]].set(True)
    cutoff = jnp.where(picked, top[:, k:], top[:, k - 1:k])  # (N, E)
    need = cutoff - scores
    lo, hi = _bias_range(bias)
    bins = jnp.clip(((need - lo) / (hi - lo) * QB_BINS).astype(jnp.int32), 0, QB_BINS - 1)
    flat = (bins + jnp.arange(e, dtype=jnp.int32) * QB_BINS).reshape(-1)
    weights = jnp.broadcast_to(vmask[:, None], (n, e)).reshape(-1)
    return jnp.zeros((e * QB_BINS,), jnp.float32).at[flat].add(weights).reshape(e, QB_BINS)


def quantile_bias(hist, bias, k: int):
    """The mean-zero bias (..., E) under which each expert would have been picked by k/E of the
    tokens in `hist` (..., E, QB_BINS), read off each expert's cumulative histogram with linear
    interpolation inside a bin; `bias` (the one the histogram was taken with) where it is empty."""
    e, nb = hist.shape[-2:]
    lo, hi = _bias_range(bias)
    cum = jnp.cumsum(hist, axis=-1)
    target = cum[..., -1:] * k / e  # (..., E, 1): every expert sees every token once
    idx = jnp.minimum(jnp.sum(cum < target, axis=-1, keepdims=True), nb - 1)  # bin reaching the target
    inside = jnp.take_along_axis(hist, idx, axis=-1)
    before = jnp.take_along_axis(cum, idx, axis=-1) - inside
    frac = jnp.clip((target - before) / jnp.maximum(inside, 1e-9), 0.0, 1.0)
    new = lo[..., None] + (idx + frac)[..., 0] * ((hi - lo) / nb)[..., None]
    new = new - jnp.mean(new, axis=-1, keepdims=True)  # top-k ignores a common shift
    return jnp.where(cum[..., -1] > 0, new, bias)


def sign_bias(bias, expert_counts, rate):
    """DeepSeek-V3's rule: bias (..., E) + rate * sign(mean load - load)."""
    mean = jnp.mean(expert_counts, axis=-1, keepdims=True)
    return bias + rate * jnp.sign(mean - expert_counts).astype(bias.dtype)


def new_router_bias(bias, stats: ForwardStats, moe: MoEConfig):
    """The selection bias after a step, from that step's stats of this layer (`ForwardStats.layer`:
    expert_counts, balance_hist)."""
    if moe.router_balance == "quantile":
        return quantile_bias(stats.balance_hist, bias, moe.experts_per_token).astype(bias.dtype)
    if moe.router_balance == "sign":
        return sign_bias(bias, stats.expert_counts, moe.bias_update_rate)
    return bias


def dispatch_capacity(x, ids, weights, valid, w_gate, w_up, w_down, capacity_factor):
    """Fixed capacity per expert, filled in token order; overflow is dropped.

    Returns (N, D) and the fraction of valid assignments dropped.
    """
    n, k = ids.shape
    e = w_gate.shape[0]
    capacity = max(1, math.ceil(capacity_factor * n * k / e))
    assign = jax.nn.one_hot(ids, e, dtype=jnp.int32) * valid[:, None, None]  # (N, K, E)
    slot = jnp.cumsum(assign.reshape(n * k, e), axis=0).reshape(n, k, e) * assign - 1  # -1: not assigned
    kept = (slot >= 0) & (slot < capacity)
    dispatch = jax.nn.one_hot(jnp.where(kept, slot, -1), capacity, dtype=x.dtype)  # (N, K, E, C)
    combine = jnp.einsum("nkec,nk->nec", dispatch, weights.astype(x.dtype))
    dispatch = dispatch.sum(axis=1)  # (N, E, C): a token visits an expert at most once
    xe = jnp.einsum("nec,nd->ecd", dispatch, x)
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xe, w_gate)) * jnp.einsum("ecd,edf->ecf", xe, w_up)
    ye = jnp.einsum("ecf,efd->ecd", h, w_down)
    total = jnp.maximum(jnp.sum(assign), 1)
    return jnp.einsum("nec,ecd->nd", combine, ye), 1.0 - jnp.sum(kept) / total


class MoE(nnx.Module):
    """x (B, T, D), valid (B, T) -> y (B, T, D), this layer's ForwardStats (expert_counts (E,), aux_loss (),
    z_loss (), dropped_fraction (), balance_hist (E, QB_BINS) with router_balance=quantile)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, execution: ExecutionConfig = ExecutionConfig()):
        self.cfg = cfg
        self.execution = execution
        moe = cfg.moe
        d, e, f = cfg.d_model, moe.num_experts, moe.expert_ffn_dim
        init = ParamInit.of(cfg)
        self.router = make_param(rngs, (d, e), init, axes=("embed", "experts"), kind="router")
        self.bias = RouterBias(jnp.zeros((e,), jnp.float32))
        expert_in = dict(axes=("experts", "embed", "expert_mlp"), in_axes=("embed",))
        self.wi_gate = make_param(rngs, (e, d, f), init, **expert_in)
        self.wi_up = make_param(rngs, (e, d, f), init, **expert_in)
        self.wo = make_param(rngs, (e, f, d), init, axes=("experts", "expert_mlp", "embed"), in_axes=("expert_mlp",))
        self.shared = SwiGLU(d, moe.num_shared_experts * f, init, rngs) if moe.num_shared_experts else None

    def __call__(self, x, valid):
        cfg, moe = self.cfg, self.cfg.moe
        b, t, d = x.shape
        xf = x.reshape(b * t, d)
        vf = valid.reshape(-1)
        logits = xf.astype(jnp.float32) @ self.router[...].astype(jnp.float32)  # (N, E)
        bias = self.bias[...]
        ids, weights = route(logits, bias, moe)
        weights = weights * vf[:, None]
        cdt = dtype_of(cfg.compute_dtype)
        experts = Experts(self.wi_gate[...].astype(cdt), self.wi_up[...].astype(cdt), self.wo[...].astype(cdt))
        if moe.dispatch == "capacity":
            y, dropped = dispatch_capacity(xf, ids, weights, vf, *experts, moe.capacity_factor)
        else:  # Transformer.__call__'s mesh (empty without one) decides how the experts run
            dispatch = expert_dispatch(self.execution, xf.shape[0], experts.gate.shape,
                                       jax.sharding.get_abstract_mesh())
            y, dropped = dispatch(xf, ids, weights, experts)
        if self.shared is not None:
            y = y + self.shared(xf)
        vmask = vf.astype(jnp.float32)
        counts = jnp.sum(jax.nn.one_hot(ids, moe.num_experts, dtype=jnp.float32) * vmask[:, None, None], axis=(0, 1))
        hist = None
        if moe.router == "sigmoid_bias" and moe.router_balance == "quantile":
            scores = jax.lax.stop_gradient(jax.nn.sigmoid(logits))
            hist = balance_histogram(scores, bias, vmask, moe.experts_per_token)
        stats = ForwardStats(
            expert_counts=counts,
            aux_loss=(moe.aux_loss_coef * _balance_loss(logits, ids, counts, vmask, b, moe)
                      if moe.aux_loss_coef else jnp.zeros((), jnp.float32)),
            z_loss=moe.router_z_loss_coef * _z_loss(logits, vmask),
            dropped_fraction=jnp.asarray(dropped, jnp.float32),
            balance_hist=hist,
        )
        return y.reshape(b, t, d).astype(x.dtype), stats


def _balance_loss(logits, ids, counts, vmask, batch: int, moe: MoEConfig):
    """Unscaled balance loss over valid tokens.

    softmax_topk: Switch-style E * sum_e f_e P_e over the batch, f_e the fraction of
    assignments to e and P_e its mean router probability.
    sigmoid_bias: DeepSeek-V3's complementary sequence-wise loss, the mean over sequences of
    sum_e f_e P_e with f_e = E / (K T) * (tokens of the sequence picking e) and P_e the mean of
    e's score normalised over experts; only P_e carries gradient.
    """
    e, k = moe.num_experts, moe.experts_per_token
    if moe.router == "softmax_topk":
        n_valid = jnp.maximum(jnp.sum(vmask), 1.0)
        f = counts / (n_valid * k)
        p = jnp.sum(jax.nn.softmax(logits, axis=-1) * vmask[:, None], axis=0) / n_valid
        return e * jnp.sum(f * p)
    scores = jax.nn.sigmoid(logits)
    share = (scores / jnp.sum(scores, axis=-1, keepdims=True)).reshape(batch, -1, e)  # (B, T, E)
    mask = vmask.reshape(batch, -1, 1)
    picks = jnp.sum(jax.nn.one_hot(ids, e, dtype=jnp.float32), axis=1).reshape(batch, -1, e)
    length = jnp.maximum(jnp.sum(mask, axis=1), 1.0)  # (B, 1)
    f = jnp.sum(picks * mask, axis=1) * e / (k * length)  # (B, E)
    p = jnp.sum(share * mask, axis=1) / length
    has_tokens = (jnp.sum(mask, axis=(1, 2)) > 0).astype(jnp.float32)
    return jnp.sum(jnp.sum(f * p, axis=-1) * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)


def _z_loss(logits, vmask):
    z = jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(z * z * vmask) / jnp.maximum(jnp.sum(vmask), 1.0)
