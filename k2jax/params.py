"""Parameter metadata: the contract between the model, the optimizer and sharding.

Every parameter the model creates carries, as `nnx.Param` metadata:

- `sharding_names`: one logical axis name per dimension (vocabulary below).
  Stacking (scanned layers, experts) prepends "layers" / "experts".
- `kind`: how the optimizer treats it. "matrix" goes to Muon; "embedding",
  "unembedding", "norm", "router", "bias" go to AdamW.
- `in_axes`: for matrices, the logical names of the fan-in (reduction) axes.
  Axes named in BATCH_AXES are independent matrices; the rest are outputs.
- `qk`: for query/key projections, segments of the last axis as
  ((role, width), ...) with roles from QK_ROLES, e.g. (("q", 64),) for MHA or
  (("q_nope", 128), ("q_rope", 64)) for MLA's q_b, (("k_nope", 128), ("v", 128))
  for MLA's kv_b. The head axis is the one named "heads" or "kv_heads".
- `stats_key`: the key of the attention-statistics dict whose max logits
  (shape (*layer_axes, H)) belong to this projection.

`param_info(state)` turns an nnx.State into a pytree of `ParamInfo` with the
same structure as the parameters, which is all the optimizer ever sees.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

# Logical axis names used by the model.
AXES = (
    "layers", "experts", "vocab", "embed", "mlp", "expert_mlp", "heads", "kv_heads",
    "head_dim", "q_lora", "kv_lora", "norm",
)
BATCH_AXES = ("layers", "experts")
HEAD_AXES = ("heads", "kv_heads")
KINDS = ("matrix", "embedding", "unembedding", "norm", "router", "bias")
QK_ROLES = ("q", "k", "q_nope", "q_rope", "k_nope", "v")


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """What the optimizer and sharding code need to know about one parameter."""

    axes: tuple[str, ...]
    kind: str
    in_axes: tuple[str, ...] = ()
    qk: Optional[tuple[tuple[str, int], ...]] = None
    stats_key: Optional[str] = None

    def __post_init__(self):
        unknown = [a for a in self.axes if a not in AXES]
        if unknown:
            raise ValueError(f"unknown logical axes {unknown} in {self.axes}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown parameter kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "matrix":
            missing = [a for a in self.in_axes if a not in self.axes]
            if not self.in_axes or missing:
                raise ValueError(f"matrix with axes {self.axes} needs in_axes among them, got {self.in_axes}")
        if self.qk is not None:
            for role, width in self.qk:
                if role not in QK_ROLES or width <= 0:
                    raise ValueError(f"bad qk segment ({role!r}, {width})")
            if self.head_axis is None or self.stats_key is None:
                raise ValueError(f"qk projection with axes {self.axes} needs a head axis and stats_key")

    @property
    def batch_axes(self) -> tuple[int, ...]:
        return tuple(i for i, a in enumerate(self.axes) if a in BATCH_AXES)

    @property
    def reduction_axes(self) -> tuple[int, ...]:
        return tuple(i for i, a in enumerate(self.axes) if a in self.in_axes)

    @property
    def output_axes(self) -> tuple[int, ...]:
        skip = set(self.batch_axes) | set(self.reduction_axes)
        return tuple(i for i in range(len(self.axes)) if i not in skip)

    @property
    def layer_axes(self) -> tuple[int, ...]:
        return tuple(i for i, a in enumerate(self.axes) if a == "layers")

    @property
    def head_axis(self) -> Optional[int]:
        found = [i for i, a in enumerate(self.axes) if a in HEAD_AXES]
        return found[0] if found else None


def is_info(x) -> bool:
    """`is_leaf` for trees of ParamInfo."""
    return isinstance(x, ParamInfo)


def param_metadata(axes, kind="matrix", in_axes=(), qk=None, stats_key=None) -> dict[str, Any]:
    """Keyword metadata for nnx.Param(value, **param_metadata(...)); validated eagerly."""
    ParamInfo(tuple(axes), kind, tuple(in_axes), qk, stats_key)  # raises on a bad contract
    meta: dict[str, Any] = dict(sharding_names=tuple(axes), kind=kind, in_axes=tuple(in_axes))
    if qk is not None:
        meta.update(qk=tuple(qk), stats_key=stats_key)
    return meta


def _info_of(variable) -> ParamInfo:
    meta = variable.get_metadata()
    axes = meta.get("out_sharding") or meta.get("sharding_names")
    if axes is None or "kind" not in meta:
        raise ValueError(f"parameter of shape {variable.shape} has no k2jax metadata (axes/kind): {meta}")
    return ParamInfo(tuple(axes), meta["kind"], tuple(meta.get("in_axes", ())), meta.get("qk"),
                     meta.get("stats_key"))


def param_info(state) -> dict:
    """ParamInfo for every Variable of an nnx.State, as a nested dict shaped like
    `nnx.to_pure_dict(state)` (the plain-array tree the optimizer is given)."""
    from flax import nnx

    tree: dict = {}
    for path, variable in nnx.to_flat_state(state):
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _info_of(variable)
    return tree
