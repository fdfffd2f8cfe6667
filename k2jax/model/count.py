"""Parameter counts read off the abstract model (nnx.eval_shape: no memory allocated)."""

from __future__ import annotations

import math

from flax import nnx

from k2jax.config import ModelConfig
from k2jax.params import ParamInfo, param_info


def abstract_model(cfg: ModelConfig):
    """The Transformer with ShapeDtypeStruct leaves instead of arrays."""
    from k2jax.model.transformer import Transformer

    return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))


def _is_routed_expert(info: ParamInfo) -> bool:
    return info.kind == "matrix" and "experts" in info.axes


def count_model_params(cfg: ModelConfig) -> dict[str, int]:
    """total, activated (routed experts weighted by K/E) and embedding parameter counts, read off
    the built (abstract) model; `flops.analytic_param_counts` derives the same from the config."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    infos = param_info(state)
    total = routed = embedding = 0
    for path, var in nnx.to_flat_state(state):
        info = _lookup(infos, path)
        size = math.prod(var.shape)
        total += size
        routed += size if _is_routed_expert(info) else 0
        embedding += size if info.kind in ("embedding", "unembedding") else 0
    active_routed = routed * cfg.moe.experts_per_token // cfg.moe.num_experts if routed else 0
    return {"total": total, "activated": total - routed + active_routed, "embedding": embedding,
            "routed_experts": routed}


def _lookup(tree, path):
    for key in path:
        tree = tree[key]
    return tree
