"""Dropless MoE dispatch under shard_map with explicit collectives, on meshes that split the tokens.

With the experts split over the mesh's `expert` axis (ep shards of E/ep experts), each shard
runs its own experts on the token copies routed to them, by one of two exchanges:

- `dispatch_all_gather`: all-gather the group's tokens (N/ep -> N rows of D), pick the
  copies for own experts, reduce-scatter the results. Receives N x D per shard, whatever
  the routing; exact and runnable everywhere.
- `dispatch_all_to_all`: send each token copy to the shard holding its expert and back
  (jax.lax.ragged_all_to_all). Moves the N/ep x K copies actually routed: ep/K times less
  than the all-gather when ep > K. Its receive buffer holds `buffer_factor` x the balanced
  inflow (0: the worst case, every copy of the group; dropless); copies past a full buffer
  are dropped and reported.

Without that split (no expert axis, or experts it does not divide), `dispatch_local` runs each
shard's own tokens through all experts: no exchange of tokens at all (GSPMD, left to partition
the global sort by expert, all-reduces the whole buffer of token copies instead).

In all three, FSDP shards of the expert weights are all-gathered inside (their gradients
reduce-scattered by AD); a tensor-split FFN width is summed with psum. On CPU the ragged
exchange runs in its all-gather form (k2jax/parallel/ragged.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from k2jax.kernels.grouped_matmul import dispatch_ragged, swiglu_grouped
from k2jax.parallel.ragged import ragged_all_to_all
from k2jax.parallel.sharding import logical_spec, spec_axes

AXIS = "expert"


class Experts(NamedTuple):
    """The experts' SwiGLU weights."""

    gate: jax.Array  # (E, D, F)
    up: jax.Array  # (E, D, F)
    down: jax.Array  # (E, F, D)


class ExpertSpecs(NamedTuple):
    """PartitionSpecs of a dispatch's operands."""

    tokens: P  # the token rows (N, 1)
    w_in: P  # gate and up (E, D, F)
    w_out: P  # down (E, F, D)


def expert_parallel_specs(n_tokens: int, expert_shape: tuple[int, int, int], mesh) -> ExpertSpecs | None:
    """Token and expert-weight PartitionSpecs for the dispatches here, or None when the mesh does
    not split the tokens, or splits the experts over its expert axis but not the tokens."""
    if mesh.empty:
        return None
    tokens = logical_spec(("batch", "norm"), (n_tokens, 1), mesh)
    w_in = logical_spec(("experts", "embed", "expert_mlp"), expert_shape, mesh)
    if tokens[0] is None or (w_in[0] == AXIS and AXIS not in spec_axes(tokens[0])):
        return None
    w_out = logical_spec(("experts", "expert_mlp", "embed"), expert_shape[:1] + expert_shape[:0:-1], mesh)
    return ExpertSpecs(tokens, w_in, w_out)


def splits_experts(specs: ExpertSpecs) -> bool:
    """Whether the experts are split over the expert axis (all-gather / all-to-all), or whole
    on every shard (`dispatch_local`)."""
    return specs.w_in[0] == AXIS


def _varying(a, axes: tuple[str, ...], spec):
    """a (laid out by spec) marked as varying over those of axes that do not split it: AD then
    sums its gradient over them right here, at a's shape, rather than at the first (larger)
    value that mixes it with varying ones."""
    split = {axis for entry in spec for axis in spec_axes(entry)}
    axes = tuple(axis for axis in axes if axis not in split)
    return jax.lax.pcast(a, axes, to="varying") if axes else a


def _whole_experts(experts: Experts, specs: ExpertSpecs) -> Experts:
    """Gather the FSDP shards of this shard's experts: whole d_model rows. Marked first as
    varying over the token axes that do not split them (data, say), so that AD reduce-scatters
    their gradients to FSDP shards before summing them over those axes, at 1/fsdp the size."""
    rows = spec_axes(specs.tokens[0])
    gate, up = _varying(experts.gate, rows, specs.w_in), _varying(experts.up, rows, specs.w_in)
    down = _varying(experts.down, rows, specs.w_out)
    for axis in spec_axes(specs.w_in[1]):
        gate = jax.lax.all_gather(gate, axis, axis=1, tiled=True)
        up = jax.lax.all_gather(up, axis, axis=1, tiled=True)
    for axis in spec_axes(specs.w_out[2]):
        down = jax.lax.all_gather(down, axis, axis=2, tiled=True)
    return Experts(gate, up, down)


def _tensor(specs: ExpertSpecs) -> tuple[str, ...]:
    """The mesh axes that split the expert FFN width (each shard computes partial sums)."""
    return spec_axes(specs.w_in[2])


def _split_width(x, specs: ExpertSpecs):
    """This shard's tokens (N/shards, D) as input to a tensor-split FFN width: AD then sums
    the partial gradients once, at this shape, not at every buffer of token copies."""
    return _varying(x, _tensor(specs), specs.tokens)


def _sum_tensor(y, specs: ExpertSpecs):
    """Sum the partial outputs of a tensor-split expert FFN width."""
    tensor = _tensor(specs)
    return jax.lax.psum(y, tensor) if tensor else y


def _shard_map(local, mesh, specs: ExpertSpecs, out_specs, x, ids, weights, experts: Experts):
    """local(x, ids, weights, experts) on each shard's token rows and expert weights."""
    token_spec = P(specs.tokens[0], None)
    in_specs = (token_spec, token_spec, token_spec, Experts(specs.w_in, specs.w_in, specs.w_out))
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(x, ids, weights, experts)


def dispatch_local(x, ids, weights, experts: Experts, mesh, specs: ExpertSpecs, impl: str = "ragged_dot"):
    """Each shard's own tokens through all experts: `dispatch_all_gather` without the exchange.
    x (N, D), ids/weights (N, K) -> (N, D), dropped fraction (0)."""

    def local(x, ids, weights, experts):
        experts = _whole_experts(experts, specs)
        y, _ = dispatch_ragged(_split_width(x, specs), ids, weights, *experts, impl)  # (N/shards, D)
        return _sum_tensor(y, specs)

    y = _shard_map(local, mesh, specs, P(specs.tokens[0], None), x, ids, weights, experts)
    return y, jnp.zeros((), jnp.float32)


def dispatch_all_gather(x, ids, weights, experts: Experts, mesh, specs: ExpertSpecs, impl: str = "ragged_dot"):
    """x (N, D), ids/weights (N, K) -> (N, D), dropped fraction (0): the same result as
    `grouped_matmul.dispatch_ragged` on one device."""

    def local(x, ids, weights, experts):
        experts = _whole_experts(experts, specs)
        gather = lambda a: jax.lax.all_gather(a, AXIS, axis=0, tiled=True)  # noqa: E731
        first_expert = jax.lax.axis_index(AXIS) * experts.gate.shape[0]
        x = gather(_split_width(x, specs))  # (N_group, D)
        y, _ = dispatch_ragged(x, gather(ids) - first_expert, gather(weights), *experts, impl)
        y = jax.lax.psum_scatter(y, AXIS, scatter_dimension=0, tiled=True)  # (N/ep, D) of own tokens
        return _sum_tensor(y, specs)

    y = _shard_map(local, mesh, specs, P(specs.tokens[0], None), x, ids, weights, experts)
    return y, jnp.zeros((), jnp.float32)


def _exclusive_cumsum(a):
    return jnp.cumsum(a) - a


def _exchange(*args):
    """The ragged all-to-all over the expert axis."""
    return ragged_all_to_all(*args, axis_name=AXIS)


def _zero_buffer(shape: tuple[int, ...], like) -> jax.Array:
    """The zero output buffer a ragged all-to-all writes into, varying over the axes `like` varies over
    and outside AD. Created invariant, it would be cast to varying at the exchange, and the backward
    pass would psum its (discarded) cotangent over every one of those axes: on kimi-k2 (fsdp 4 x expert
    128, buffer factor 1.25) a full (81920, 7168) all-reduce per layer, 66 of a step's 136 GiB of
    all-reduces."""
    zeros = jnp.zeros(shape, like.dtype)
    axes = tuple(sorted(jax.typeof(like).manual_axis_type.varying))
    return jax.lax.stop_gradient(jax.lax.pcast(zeros, axes, to="varying") if axes else zeros)


def buffer_rows(n_local: int, k: int, ep: int, buffer_factor: float) -> int:
    """Rows of a shard's receive buffer: buffer_factor x its balanced inflow (n_local x K),
    capped at (and, for 0, equal to) the worst case: all ep x n_local x K copies of the group."""
    worst = ep * n_local * k
    return worst if buffer_factor == 0 else min(worst, max(1, math.ceil(buffer_factor * n_local * k)))


def dispatch_all_to_all(x, ids, weights, experts: Experts, mesh, specs: ExpertSpecs, impl: str = "ragged_dot",
                        buffer_factor: float = 0.0):
    """Like `dispatch_all_gather`, but every token copy travels to its expert's shard and back.

    Returns (N, D) and the fraction of token copies dropped by full receive buffers (0 when
    buffer_factor is 0). Copies are accepted in (source shard, expert) order, so a full
    buffer drops the tail of the last sources' copies.
    """
    ep = mesh.shape[AXIS]

    def local(x, ids, weights, experts):
        experts = _whole_experts(experts, specs)
        x = _split_width(x, specs)
        n, k = ids.shape  # this shard's tokens
        e_local = experts.gate.shape[0]
        flat = ids.reshape(-1)
        order = jnp.argsort(flat, stable=True)  # copies by expert, hence by destination shard
        copies = x[order // k]  # (n*k, D)
        counts = jnp.bincount(flat, length=ep * e_local).reshape(ep, e_local)  # (dest shard, its expert)
        to_me = jax.lax.all_to_all(counts, AXIS, 0, 0, tiled=True)  # (source shard, my expert)
        rows = buffer_rows(n, k, ep, buffer_factor)
        wanted = to_me.reshape(-1)
        accepted = jnp.clip(rows - _exclusive_cumsum(wanted), 0, wanted)  # (ep * e_local,) fills in order
        accepted_from = accepted.reshape(ep, e_local).sum(1)  # (ep,) a prefix of each source's slice
        recv_offsets = _exclusive_cumsum(accepted_from)
        send_offsets = _exclusive_cumsum(counts.sum(1))
        send_sizes = jax.lax.all_to_all(accepted_from, AXIS, 0, 0, tiled=True)  # (ep,) taken by each dest
        landing = jax.lax.all_to_all(recv_offsets, AXIS, 0, 0, tiled=True)  # where my slices land
        received = _exchange(copies, _zero_buffer((rows, x.shape[1]), copies), send_offsets, send_sizes, landing,
                             accepted_from)  # (rows, D): by source, then expert; unused rows zero

        # group the received rows by own expert (rows past the accepted ones get e_local: none)
        row_group = jnp.searchsorted(jnp.cumsum(accepted), jnp.arange(rows), side="right")
        expert = jnp.where(row_group < ep * e_local, row_group % e_local, e_local)
        by_expert = jnp.argsort(expert, stable=True)
        group_sizes = jnp.bincount(expert, length=e_local).astype(jnp.int32)
        out = swiglu_grouped(impl)(received[by_expert], *experts, group_sizes)
        out = jnp.zeros_like(out).at[by_expert].set(out)

        back = _exchange(out, _zero_buffer(copies.shape, out), recv_offsets, accepted_from,
                         jax.lax.all_to_all(send_offsets, AXIS, 0, 0, tiled=True), send_sizes)  # (n*k, D)
        y = jnp.zeros_like(back).at[order].set(back).reshape(n, k, -1)  # dropped copies are zero
        y = jnp.einsum("nkd,nk->nd", y, weights.astype(y.dtype))
        dropped = (n * k - jnp.sum(send_sizes)).astype(jnp.float32)[None]  # (1,) per shard
        return _sum_tensor(y, specs), dropped

    token_axes = specs.tokens[0]
    y, dropped = _shard_map(local, mesh, specs, (P(token_axes, None), P(token_axes)), x, ids, weights, experts)
    return y, jnp.sum(dropped) / ids.size
