"""Mixture-of-Experts FFN: DeepSeek-V3 routing, dropless ragged dispatch, capacity dispatch.

Routing is a pure function (`route`); expert compute either sorts token copies by
expert and runs jax.lax.ragged_dot (dropless, default; with explicit all-gather /
reduce-scatter over the mesh's expert axis when the experts are sharded) or packs them into
fixed-capacity (E, C, D) buffers with one-hot einsums (the GSPMD expert-parallel
form, which drops overflow). The aux-loss-free balancing bias lives in a
RouterBias variable that the optimizer never sees; `update_router_bias` is the
pure update the train step applies after each step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config import ModelConfig
from k2jax.model.layers import SwiGLU, dtype_of, make_param
from k2jax.parallel.sharding import logical_spec
from k2jax.platform import target_platform


TILE_ROWS = 64  # rows per tile of the tiled grouped matmul


class RouterBias(nnx.Variable):
    """Per-expert selection bias (E,) for aux-loss-free load balancing (not trained by gradients)."""


def route(logits, bias, cfg: ModelConfig):
    """Router logits (N, E) float32 -> expert ids (N, K) int32, combine weights (N, K) float32."""
    n, e = logits.shape
    k = cfg.experts_per_token
    if cfg.router == "sigmoid_bias":
        scores = jax.nn.sigmoid(logits)
        choice = scores + bias  # the bias steers selection only, never the combine weights
        groups = choice.reshape(n, cfg.num_expert_groups, e // cfg.num_expert_groups)
        group_score = jax.lax.top_k(groups, min(2, groups.shape[-1]))[0].sum(-1)  # (N, G)
        top_groups = jax.lax.top_k(group_score, cfg.top_groups)[1]
        group_mask = jnp.zeros_like(group_score, bool).at[jnp.arange(n)[:, None], top_groups].set(True)
        allowed = jnp.repeat(group_mask, e // cfg.num_expert_groups, axis=1)
        ids = jax.lax.top_k(jnp.where(allowed, choice, -jnp.inf), k)[1]
        weights = jnp.take_along_axis(scores, ids, axis=1)
    else:
        probs = jax.nn.softmax(logits, axis=-1)
        weights, ids = jax.lax.top_k(probs, k)
    if cfg.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return ids.astype(jnp.int32), weights * cfg.routed_scaling_factor


def update_router_bias(bias, expert_counts, rate):
    """bias (..., E) + rate * sign(mean load - load): overloaded experts become less likely."""
    mean = jnp.mean(expert_counts, axis=-1, keepdims=True)
    return bias + rate * jnp.sign(mean - expert_counts).astype(bias.dtype)


def _swiglu_ragged(xs, gate, up, down, group_sizes):
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, group_sizes)) * jax.lax.ragged_dot(xs, up, group_sizes)
    return jax.lax.ragged_dot(h, down, group_sizes)


def _swiglu_tiled(xs, gate, up, down, group_sizes, tile: int = TILE_ROWS):
    """The expert SwiGLU on rows sorted by expert, as batched matmuls over fixed-size tiles.

    xs (M, D) sorted by group, group_sizes (E,) with sum <= M (later rows belong to no expert
    and come back zero). Each group is padded to whole tiles of `tile` rows, so every tile
    belongs to one expert and its weights are gathered per tile: (M + E * tile) rows of work
    instead of the E * M that jax.lax.ragged_dot's dense fallback (CPU) computes.
    """
    m, e = xs.shape[0], gate.shape[0]
    num_tiles = -(-m // tile) + e  # static bound: each group wastes less than one tile
    padded = -(-group_sizes // tile) * tile  # (E,)
    padded_start = jnp.cumsum(padded) - padded
    group_end = jnp.cumsum(group_sizes)
    row = jnp.arange(m)
    group = jnp.searchsorted(group_end, row, side="right")  # (M,), e for rows past every group
    in_group = group < e
    group = jnp.minimum(group, e - 1)
    # (M,) padded position of each row; rows past every group point past the end and are dropped
    dest = jnp.where(in_group, padded_start[group] + row - (group_end - group_sizes)[group], num_tiles * tile)
    x_tiles = jnp.zeros((num_tiles * tile, xs.shape[1]), xs.dtype).at[dest].set(xs, mode="drop")
    x_tiles = x_tiles.reshape(num_tiles, tile, -1)  # (T, tile, D)
    tile_start = jnp.arange(num_tiles) * tile
    tile_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), tile_start, side="right"), e - 1)  # (T,)
    h = jax.nn.silu(jnp.einsum("tmd,tdf->tmf", x_tiles, gate[tile_group]))  # (T, tile, F)
    h = h * jnp.einsum("tmd,tdf->tmf", x_tiles, up[tile_group])
    y = jnp.einsum("tmf,tfd->tmd", h, down[tile_group]).reshape(num_tiles * tile, -1)  # (T * tile, D)
    return jnp.where(in_group[:, None], y.at[dest].get(mode="fill", fill_value=0), 0)  # (M, D)


def grouped_matmul_impl(cfg: ModelConfig) -> str:
    """"ragged_dot" or "tiled" for cfg.grouped_matmul ("auto": tiled on CPU, where ragged_dot
    is lowered densely over all experts; XLA's ragged dot on GPU and TPU)."""
    if cfg.grouped_matmul != "auto":
        return cfg.grouped_matmul
    return "tiled" if target_platform() == "cpu" else "ragged_dot"


def dispatch_ragged(x, ids, weights, w_gate, w_up, w_down, impl: str = "ragged_dot"):
    """Dropless: x (N, D), ids/weights (N, K), expert weights (E, D, F)/(E, F, D) -> (N, D).

    Ids outside [0, E) are token copies meant for experts held elsewhere: they sort
    last, fall outside every group (their rows come back zero) and add nothing.
    impl: "ragged_dot" (jax.lax.ragged_dot) or "tiled" (`_swiglu_tiled`).
    """
    n, k = ids.shape
    e = w_gate.shape[0]
    flat = ids.reshape(-1)
    here = (flat >= 0) & (flat < e)
    expert = jnp.where(here, flat, e)  # copies for experts held elsewhere sort last
    order = jnp.argsort(expert, stable=True)  # token copies grouped by expert
    group_sizes = jnp.bincount(expert, length=e).astype(jnp.int32)
    swiglu = _swiglu_tiled if impl == "tiled" else _swiglu_ragged
    ys = swiglu(x[order // k], w_gate, w_up, w_down, group_sizes)  # (N*K, D)
    ys = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)
    weights = jnp.where(here.reshape(n, k), weights, 0.0)
    return jnp.einsum("nkd,nk->nd", ys, weights.astype(ys.dtype)), jnp.zeros((), jnp.float32)


def expert_parallel_specs(n_tokens: int, expert_shape: tuple[int, int, int], mesh):
    """Token and expert-weight PartitionSpecs for `dispatch_expert_parallel`, or None when
    the mesh does not split both the tokens and the experts over its expert axis."""
    if "expert" not in mesh.axis_names or mesh.shape["expert"] == 1:
        return None
    tokens = logical_spec(("batch", "norm"), (n_tokens, 1), mesh)
    w_in = logical_spec(("experts", "embed", "expert_mlp"), expert_shape, mesh)
    if "expert" not in _axes(tokens[0]) or w_in[0] != "expert":
        return None
    w_out = logical_spec(("experts", "expert_mlp", "embed"), expert_shape[:1] + expert_shape[:0:-1], mesh)
    return tokens, w_in, w_out


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def dispatch_expert_parallel(x, ids, weights, w_gate, w_up, w_down, mesh, specs, impl: str = "ragged_dot"):
    """Dropless expert parallelism with explicit collectives (shard_map), same result as dispatch_ragged.

    Each expert-axis shard holds E/ep experts. It all-gathers the token copies of its
    expert-axis group (x, ids, weights: (N/ep, ...) -> (N, ...)), runs its own experts on
    the copies routed to them, and a reduce-scatter returns every token's sum to the shard
    that owns it. FSDP shards of the expert weights are all-gathered inside (their
    gradients reduce-scattered by AD); a tensor-split FFN width is summed with psum.
    """
    tokens, w_in, w_out = specs
    token_spec = jax.sharding.PartitionSpec(tokens[0], None)

    def local(x, ids, weights, w_gate, w_up, w_down):
        for axis in _axes(w_in[1]):  # FSDP: whole d_model rows for this shard's experts
            w_gate = jax.lax.all_gather(w_gate, axis, axis=1, tiled=True)
            w_up = jax.lax.all_gather(w_up, axis, axis=1, tiled=True)
        for axis in _axes(w_out[2]):
            w_down = jax.lax.all_gather(w_down, axis, axis=2, tiled=True)
        gather = lambda a: jax.lax.all_gather(a, "expert", axis=0, tiled=True)  # noqa: E731
        first_expert = jax.lax.axis_index("expert") * w_gate.shape[0]
        y, _ = dispatch_ragged(gather(x), gather(ids) - first_expert, gather(weights), w_gate, w_up, w_down,
                               impl)
        y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)  # (N/ep, D) of own tokens
        tensor = _axes(w_in[2])
        return jax.lax.psum(y, tensor) if tensor else y

    y = jax.shard_map(local, mesh=mesh, in_specs=(token_spec, token_spec, token_spec, w_in, w_in, w_out),
                      out_specs=token_spec)(x, ids, weights, w_gate, w_up, w_down)
    return y, jnp.zeros((), jnp.float32)


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
    """x (B, T, D), valid (B, T) -> y (B, T, D), stats (expert_counts (E,), aux_loss, z_loss, dropped_fraction)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, e, f = cfg.d_model, cfg.num_experts, cfg.expert_ffn_dim
        self.router = make_param(rngs, (d, e), cfg, axes=("embed", "experts"), kind="router")
        self.bias = RouterBias(jnp.zeros((e,), jnp.float32))
        expert_in = dict(axes=("experts", "embed", "expert_mlp"), in_axes=("embed",))
        self.wi_gate = make_param(rngs, (e, d, f), cfg, **expert_in)
        self.wi_up = make_param(rngs, (e, d, f), cfg, **expert_in)
        self.wo = make_param(rngs, (e, f, d), cfg, axes=("experts", "expert_mlp", "embed"), in_axes=("expert_mlp",))
        self.shared = SwiGLU(cfg, cfg.num_shared_experts * f, rngs) if cfg.num_shared_experts else None

    def __call__(self, x, valid):
        cfg = self.cfg
        b, t, d = x.shape
        xf = x.reshape(b * t, d)
        vf = valid.reshape(-1)
        logits = xf.astype(jnp.float32) @ self.router[...].astype(jnp.float32)  # (N, E)
        ids, weights = route(logits, self.bias[...], cfg)
        weights = weights * vf[:, None]
        cdt = dtype_of(cfg.compute_dtype)
        experts = (self.wi_gate[...].astype(cdt), self.wi_up[...].astype(cdt), self.wo[...].astype(cdt))
        mesh = jax.sharding.get_abstract_mesh()  # set by the train/eval step around its trace (else empty)
        use_ep = cfg.expert_parallel == "shard_map"
        ep_specs = expert_parallel_specs(xf.shape[0], experts[0].shape, mesh) if use_ep else None
        if cfg.moe_dispatch == "ragged" and ep_specs is not None:
            y, dropped = dispatch_expert_parallel(xf, ids, weights, *experts, mesh, ep_specs,
                                                  grouped_matmul_impl(cfg))
        elif cfg.moe_dispatch == "ragged":
            y, dropped = dispatch_ragged(xf, ids, weights, *experts, grouped_matmul_impl(cfg))
        else:
            y, dropped = dispatch_capacity(xf, ids, weights, vf, *experts, cfg.capacity_factor)
        if self.shared is not None:
            y = y + self.shared(xf)
        vmask = vf.astype(jnp.float32)
        counts = jnp.sum(jax.nn.one_hot(ids, cfg.num_experts, dtype=jnp.float32) * vmask[:, None, None], axis=(0, 1))
        return y.reshape(b, t, d).astype(x.dtype), {
            "expert_counts": counts,
            "aux_loss": cfg.aux_loss_coef * _balance_loss(logits, counts, vmask, cfg),
            "z_loss": cfg.router_z_loss_coef * _z_loss(logits, vmask),
            "dropped_fraction": jnp.asarray(dropped, jnp.float32),
        }


def _balance_loss(logits, counts, vmask, cfg: ModelConfig):
    """Switch-style E * sum_e f_e * P_e over valid tokens (softmax router only)."""
    if cfg.router != "softmax_topk":
        return jnp.zeros((), jnp.float32)
    n_valid = jnp.maximum(jnp.sum(vmask), 1.0)
    f = counts / (n_valid * cfg.experts_per_token)
    p = jnp.sum(jax.nn.softmax(logits, axis=-1) * vmask[:, None], axis=0) / n_valid
    return cfg.num_experts * jnp.sum(f * p)


def _z_loss(logits, vmask):
    z = jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(z * z * vmask) / jnp.maximum(jnp.sum(vmask), 1.0)
