"""Muon's Newton-Schulz on a mesh: every matrix orthogonalised once, by one owner device.

Left to GSPMD, Newton-Schulz on sharded weights all-reduces X X^T at every iteration and
repeats the small products on every device (the stacked layers/experts axes that optax
flattens into one batch get all-gathered too). Here each parameter's update runs through
`shard_map` with explicit collectives instead:

1. Devices that hold pieces of the same matrices form a group: the mesh axes that split the
   parameter's matrix dimensions (fsdp on d_model, tensor on heads or FFN width) and the
   axes it is replicated over (data, or expert for a dense weight). The axes that split its
   stacked layers/experts dimensions separate groups that hold different matrices.
2. Within a group, the local stack of M matrix pieces (M = local layers x experts) is
   padded to a multiple of the group size G and exchanged by all-to-all over each splitting
   axis, so each device ends with M/G whole matrices (replica axes need no traffic: each
   replica keeps its share of the rows it already has).
3. Each device orthogonalises its own M/G matrices (optax's Newton-Schulz, float32 or
   bfloat16 iterations), then the reverse all-to-alls put every piece back where it came
   from; replicas all-gather the shares.

A matrix whose pieces all sit on one device (experts split only over the expert axis) has
a group of one: it is orthogonalised where it is, with no traffic. Bytes moved per device
per step: about twice the parameter's local size (there and back), never per iteration.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers
from optax.contrib._muon import orthogonalize_via_newton_schulz  # not exported by optax 0.2.8

from k2jax.params import ParamInfo
from k2jax.parallel.sharding import logical_spec, spec_axes


@dataclasses.dataclass(frozen=True)
class OwnerLayout:
    """How one parameter's matrices reach their owners, in the (M, *matrix dims) local layout."""

    spec: P  # the parameter's PartitionSpec
    order: tuple[int, ...]  # parameter dims reordered: stacked (batch) dims first, then matrix dims
    exchanges: tuple[tuple[int, str], ...]  # (dim in the local layout, mesh axis), in all-to-all order
    replicas: tuple[str, ...]  # mesh axes over which the parameter is replicated
    group: int  # devices sharing each local stack of matrices
    dimension_numbers: MuonDimensionNumbers  # of the (M, *matrix dims) layout


def owner_layout(info: ParamInfo, shape: tuple[int, ...], mesh) -> OwnerLayout:
    spec = logical_spec(info.axes, shape, mesh, strict=True)
    spec = P(*(tuple(spec) + (None,) * (len(shape) - len(spec))))
    batch = info.batch_axes
    matrix = tuple(i for i in range(len(shape)) if i not in batch)
    exchanges = []
    for position, dim in enumerate(matrix, start=1):
        for axis in reversed(spec_axes(spec[dim])):  # inner mesh axis first: pieces concatenate in order
            exchanges.append((position, axis))
    used = {axis for entry in spec for axis in spec_axes(entry)}
    replicas = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in used)
    group = math.prod(mesh.shape[a] for _, a in exchanges) * math.prod(mesh.shape[a] for a in replicas)
    reduction = tuple(p for p, dim in enumerate(matrix, start=1) if dim in info.reduction_axes)
    output = tuple(p for p, dim in enumerate(matrix, start=1) if dim not in info.reduction_axes)
    return OwnerLayout(spec, batch + matrix, tuple(exchanges), replicas, group,
                       MuonDimensionNumbers(reduction_axis=reduction, output_axis=output))


def orthogonalise_owned(u, layout: OwnerLayout, mesh, orthogonalise):
    """u: one parameter's (global) update; orthogonalise: (K, *matrix dims) -> same, per matrix."""
    inverse = tuple(sorted(range(len(layout.order)), key=layout.order.__getitem__))
    n_batch = len(layout.order) - len(layout.dimension_numbers.reduction_axis) - len(
        layout.dimension_numbers.output_axis)

    def local(x):  # x: this device's block of the parameter
        x = jnp.transpose(x, layout.order)
        lead = x.shape[:n_batch]
        x = x.reshape((math.prod(lead),) + x.shape[n_batch:])  # (M, *matrix dims)
        m = x.shape[0]
        padded = -(-m // layout.group) * layout.group
        x = jnp.pad(x, [(0, padded - m)] + [(0, 0)] * (x.ndim - 1))
        for dim, axis in layout.exchanges:  # (M, pieces) -> (M / n, whole along dim)
            x = jax.lax.all_to_all(x, axis, 0, dim, tiled=True)
        if layout.replicas:  # each replica keeps its share
            share = x.shape[0] // math.prod(mesh.shape[a] for a in layout.replicas)
            x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(layout.replicas) * share, share)
        x = orthogonalise(x)  # (M / G, *matrix dims): this device's own matrices
        if layout.replicas:
            x = jax.lax.all_gather(x, layout.replicas, axis=0, tiled=True)
        for dim, axis in reversed(layout.exchanges):
            x = jax.lax.all_to_all(x, axis, dim, 0, tiled=True)
        x = x[:m].reshape(lead + x.shape[1:])
        return jnp.transpose(x, inverse)

    return jax.shard_map(local, mesh=mesh, in_specs=layout.spec, out_specs=layout.spec, check_vma=False)(u)


def owner_newton_schulz_tree(infos, mesh, ns_coeffs, ns_steps: int, dtype):
    """updates -> updates: each Muon update (momentum-averaged, normalised; MaskedNode elsewhere)
    orthogonalised on its owner device with Newton-Schulz iterations in `dtype`, cast back, in the
    update's own sharding."""
    coeffs = jnp.asarray(ns_coeffs, dtype)

    def owned(u, info):
        if isinstance(u, optax.MaskedNode):
            return u
        layout = owner_layout(info, u.shape, mesh)

        def orthogonalise(x):
            return orthogonalize_via_newton_schulz(x.astype(dtype), coeffs, ns_steps,
                                                   dimension_numbers=layout.dimension_numbers).astype(x.dtype)

        return orthogonalise_owned(u, layout, mesh, orthogonalise)

    return lambda updates: jax.tree.map(owned, updates, infos, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
