"""Device mesh and the one table that maps logical axes to mesh axes.

Mesh axes: data (batch), fsdp (batch and parameter shards), expert (MoE experts)
and tensor (heads / FFN width). Changing the parallelism is a change of
MeshConfig, never of model code. Axes are Auto (GSPMD propagation), because
jax.lax.ragged_dot does not support Explicit-axis meshes (REFERENCES.md).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from k2jax.config import ConfigError, MeshConfig
from k2jax.params import ParamInfo

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axes it is sharded over (in priority order); unlisted axes replicate.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "mlp": ("tensor",),
    "expert_mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "experts": ("expert",),
    "q_lora": (),
    "kv_lora": (),
    "head_dim": (),
    "layers": (),
    "norm": (),
}


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh; one axis may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [cfg.data, cfg.fsdp, cfg.expert, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices are not divisible by the fixed axes ({known})")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh: axes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, "
                          f"have {len(devices)}")
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for an array with these logical axes; a mesh axis is used at most once,
    and only where it divides the dimension (otherwise that dimension replicates)."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        chosen = []
        size = 1
        for mesh_axis in LOGICAL_RULES.get(name, ()):
            n = mesh.shape[mesh_axis]
            if mesh_axis in used or n == 1 or dim % (size * n):
                continue
            chosen.append(mesh_axis)
            size *= n
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec)


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, an axis name, or a tuple of them)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def param_shardings(infos, params, mesh: Mesh):
    """NamedSharding for every parameter, from its ParamInfo logical axes."""
    return jax.tree.map(lambda info, x: NamedSharding(mesh, logical_spec(info.axes, x.shape, mesh)),
                        infos, params, is_leaf=lambda x: isinstance(x, ParamInfo))


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Batches (B, T) are split over the data-parallel axes."""
    return NamedSharding(mesh, logical_spec(("batch",) + ("norm",) * (len(shape) - 1), shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(tx, params, shardings, mesh: Mesh):
    """Shardings for tx.init(params): every per-parameter leaf (momentum, moments) like its
    parameter, found by the parameter's key path ending the state leaf's path; everything
    else (counts, schedules, clip metrics) replicated."""
    by_path = {tuple(path): s for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    shapes = {tuple(path): x.shape for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def pick(path, leaf):
        tail = []
        for key in reversed(path):  # the trailing dict keys name the parameter
            if not isinstance(key, jax.tree_util.DictKey):
                break
            tail.insert(0, key)
        tail = tuple(tail)
        if tail in by_path and shapes[tail] == leaf.shape:
            return by_path[tail]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, params))
