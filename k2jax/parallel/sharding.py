"""Device mesh and the one table that maps logical axes to mesh axes.

Mesh axes: data (batch), fsdp (batch and parameter shards), expert (MoE experts)
and tensor (heads / FFN width). Changing the parallelism is a change of
MeshConfig, never of model code. Axes are Auto (GSPMD propagation), because
jax.lax.ragged_dot does not support Explicit-axis meshes (its sharding rule raises "Explicit
sharding inference for ragged_dot_general is not currently implemented" without out_sharding).

Parameters (and the optimizer state laid out like them) are placed strictly: a
mesh axis of size > 1 that LOGICAL_RULES assigns to a dimension must divide it,
or `param_shardings` raises a ConfigError before anything compiles (silently
replicating, say, every weight because fsdp does not divide d_model would cost
the whole model on every device). The exceptions, REPLICATE_IF_UNEVEN, replicate
their dimension over a mesh axis that does not divide it:
- kv_heads: GQA can have fewer key/value groups than tensor shards; the usual
  answer is to replicate the (small) key/value projections over that axis.
- q_lora, kv_lora: MLA's latent ranks are model choices (the `large` preset's
  kv_lora_rank is 216 = 8 x 27, which fsdp 16 does not divide); an uneven rank
  replicates only the up-projections wq_b / wkv_b over fsdp, heads still split
  over tensor: for `large` on fsdp 16, wkv_b's 37M of 58B parameters. The down-
  projections wq_a / wkv_a are split over fsdp by their d_model axis.
Activations (batch, the embedding gather, attention shards) stay lenient: a mesh
axis that does not divide a dimension is skipped. `k2jax info --params` prints
every parameter's placement on a mesh.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from k2jax.config import ConfigError, MeshConfig
from k2jax.params import is_info

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axes it is sharded over (in priority order); unlisted axes replicate.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "embed": ("fsdp", "expert"),  # dense weights split over the expert axis too (experts take it first)
    "vocab": ("tensor",),
    "mlp": ("tensor",),
    "expert_mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "experts": ("expert",),
    "q_lora": ("fsdp",),
    "kv_lora": ("fsdp",),
    "head_dim": (),
    "layers": (),
    "norm": (),
}

# Parameter axes that replicate where their mesh axis does not divide them (module docstring).
REPLICATE_IF_UNEVEN = frozenset({"kv_heads", "q_lora", "kv_lora"})


def mesh_sizes(cfg: MeshConfig, n_devices: int) -> list[int]:
    """Axis sizes (in MESH_AXES order) for n_devices; a -1 axis takes what the fixed axes leave."""
    sizes = [cfg.data, cfg.fsdp, cfg.expert, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh: {n_devices} devices are not divisible by the fixed axes ({known})")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh: axes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, "
                          f"have {n_devices}")
    return sizes


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh; one axis may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    grid = np.asarray(devices).reshape(mesh_sizes(cfg, len(devices)))
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def abstract_mesh(cfg: MeshConfig, n_devices: int | None = None) -> AbstractMesh:
    """The mesh's shape without devices, to lay out runs larger than this machine. n_devices
    defaults to the product of the fixed axes (a -1 axis is then 1)."""
    if n_devices is None:
        n_devices = math.prod(s for s in (cfg.data, cfg.fsdp, cfg.expert, cfg.tensor) if s != -1)
    return AbstractMesh(tuple(mesh_sizes(cfg, n_devices)), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh | AbstractMesh, *,
                 strict: bool = False, name: str = "array") -> P:
    """PartitionSpec for an array with these logical axes; a mesh axis is used at most once.
    A mesh axis that does not divide its dimension is skipped (that dimension replicates over it),
    unless strict (parameters): then it is a ConfigError naming `name`, except for the logical
    axes in REPLICATE_IF_UNEVEN."""
    used: set[str] = set()
    spec = []
    for logical, dim in zip(axes, shape):
        chosen = []
        size = 1
        for mesh_axis in LOGICAL_RULES.get(logical, ()):
            n = mesh.shape[mesh_axis]
            if mesh_axis in used or n == 1:
                continue
            if dim % (size * n):
                if strict and logical not in REPLICATE_IF_UNEVEN:
                    raise _uneven_error(name, logical, dim, mesh_axis, n)
                continue
            chosen.append(mesh_axis)
            size *= n
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec)


def _uneven_error(name: str, logical: str, dim: int, mesh_axis: str, n: int) -> ConfigError:
    fits = math.gcd(dim, n)
    return ConfigError(
        f"mesh.{mesh_axis}={n} does not divide the {logical!r} dimension ({dim}) of {name}: it would be "
        f"whole on every device instead of split. Use mesh.{mesh_axis}={fits} (the largest size dividing "
        f"both) and give the remaining factor {n // fits} to another mesh axis, or change the model so that "
        f"{dim} is a multiple of {n} (rules: k2jax/parallel/sharding.py)")


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, an axis name, or a tuple of them)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def param_shardings(infos, params, mesh: Mesh | AbstractMesh):
    """NamedSharding for every parameter, from its ParamInfo logical axes; a mesh axis that does
    not divide the dimension it is assigned to is a ConfigError (see the module docstring)."""

    def shard(path, info, x):
        name = f"parameter {'/'.join(str(getattr(k, 'key', k)) for k in path)} {tuple(x.shape)}"
        return NamedSharding(mesh, logical_spec(info.axes, x.shape, mesh, strict=True, name=name))

    return jax.tree_util.tree_map_with_path(shard, infos, params, is_leaf=is_info)


def spec_text(spec: P) -> str:
    """A PartitionSpec as "(fsdp,-,tensor)": one entry per dimension, "-" where it replicates."""
    return "(" + ",".join("+".join(spec_axes(entry)) or "-" for entry in spec) + ")"


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
