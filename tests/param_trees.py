"""Shared test helper: ParamInfo shorthand and a K2-shaped miniature parameter tree."""

import jax
import jax.numpy as jnp

from k2jax.params import ParamInfo


def make_info(axes, in_axes, kind="matrix", **kw):
    return ParamInfo(tuple(axes), kind, tuple(in_axes), **kw)


def k2_tree(key=0):
    """A K2-shaped miniature: stacked experts, a scanned matrix, an embedding, a norm."""
    k = jax.random.split(jax.random.key(key), 4)
    params = {
        "experts": jax.random.normal(k[0], (4, 16, 24)),
        "layers_w": jax.random.normal(k[1], (3, 16, 8)),
        "embed": jax.random.normal(k[2], (50, 16)),
        "norm": jnp.ones((16,)),
    }
    infos = {
        "experts": make_info(("experts", "embed", "expert_mlp"), ("embed",)),
        "layers_w": make_info(("layers", "embed", "mlp"), ("embed",)),
        "embed": make_info(("vocab", "embed"), (), kind="embedding"),
        "norm": make_info(("norm",), (), kind="norm"),
    }
    return params, infos
