"""A fused attention kernel run per shard under the mesh the model is traced for."""

from __future__ import annotations

import jax

from k2jax.parallel.sharding import logical_spec, spec_axes


def attend_per_shard(kernel, q, k, v, segment_ids, scale):
    """Run a fused attention kernel on each shard's own batch rows and heads.

    A Pallas kernel is opaque to GSPMD, which would gather the whole batch onto every device
    to run it. Attention is independent per (row, head), so under the mesh the layers are
    traced for (`Transformer.__call__`'s mesh) each shard runs the kernel on its rows (batch axes) and
    heads (tensor axis, when the key/value groups split the same way); the per-head max
    logits are then maxed over the batch shards. Same contract as `attend` otherwise.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, segment_ids, scale)
    b, _, h, _ = q.shape
    batch = logical_spec(("batch",), (b,), mesh)[0]
    heads = logical_spec(("heads",), (h,), mesh)[0]
    head_shards = 1
    for axis in spec_axes(heads):
        head_shards *= mesh.shape[axis]
    if k.shape[2] % head_shards:  # GQA groups that do not split like the query heads: keep heads whole
        heads = None
    if batch is None and heads is None:
        return kernel(q, k, v, segment_ids, scale)
    rows = jax.sharding.PartitionSpec(batch, None, heads, None)

    def local(q, k, v, segment_ids):
        out, max_logits = kernel(q, k, v, segment_ids, scale)
        return out, jax.lax.pmax(max_logits, spec_axes(batch)) if batch is not None else max_logits

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, jax.sharding.PartitionSpec(batch, None)),
                         out_specs=(rows, jax.sharding.PartitionSpec(heads)), check_vma=False)(q, k, v, segment_ids)
