"""QK-Clip as an optax transformation: cap each head's max attention logit at tau.

Placed last in the chain, it receives the final updates u (learning rate and
decay applied), the pre-update weights W and, as the extra argument
`attn_max_logits`, S_h per head measured in this step's forward pass. With
gamma_h = min(1, tau / S_h) it returns u' with W + u' = scale * (W + u), where
scale is gamma_h raised to a per-column exponent:

  MHA (kv heads == heads):  q by gamma^alpha, k by gamma^(1 - alpha)
  GQA (kv heads <  heads):  q by gamma (each query head), shared k untouched
  MLA:                      q_nope by gamma^alpha, k_nope by gamma^(1 - alpha),
                            q_rope by gamma; shared rotary key and v untouched

so every clipped head's logits scale by exactly gamma_h. GQA is query-only
because one key head serves several query heads: shrinking the key would also
shrink heads that were under tau, and a symmetric split applied to a shared key
compounds over steps toward zero. Heads with S_h <= tau keep u bitwise. The
clip never touches optimizer state (momentum).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from k2jax.params import ParamInfo


class QKClipState(NamedTuple):
    clipped_heads: jax.Array  # int32: heads with S_h > tau in the last step
    min_gamma: jax.Array  # float32: smallest gamma_h in the last step (1 if none clipped)


def _grouped_keys(params, infos) -> set[str]:
    """Stats keys whose key projection has fewer heads than its queries (GQA).

    Decided from the parameters' head counts, never from axis names: MHA's key projection
    is named `kv_heads` like GQA's but has as many heads as the queries.
    """
    heads: dict[str, set[int]] = {}

    def record(w, info):
        if info.qk is not None:
            heads.setdefault(info.stats_key, set()).add(w.shape[info.head_axis])

    jax.tree.map(record, params, infos)
    return {key for key, counts in heads.items() if len(counts) > 1}


def _exponents(info: ParamInfo, alpha: float, grouped: bool) -> np.ndarray:
    """Per-column exponent of gamma along the last (head_dim) axis."""
    table = {
        "q": 1.0 if grouped else alpha,
        "k": 0.0 if grouped else 1.0 - alpha,
        "q_nope": alpha,
        "k_nope": 1.0 - alpha,
        "q_rope": 1.0,
        "v": 0.0,
    }
    return np.concatenate([np.full(width, table[role], np.float32) for role, width in info.qk])


def _gamma_for(path, info: ParamInfo, shape, stats, tau):
    """gamma (*layers, H) broadcast against a parameter of `shape`, validated."""
    name = jax.tree_util.keystr(path)
    if info.stats_key not in stats:
        raise ValueError(f"qk_clip: attn_max_logits has no entry {info.stats_key!r} for parameter {name}; "
                         f"got keys {sorted(stats)}")
    s = jnp.asarray(stats[info.stats_key], jnp.float32)
    layer_dims = tuple(shape[i] for i in info.layer_axes)
    head_dim = shape[info.head_axis]
    heads = s.shape[-1] if s.ndim else None
    if s.shape[:-1] != layer_dims or heads is None or heads % head_dim:
        raise ValueError(f"qk_clip: attn_max_logits[{info.stats_key!r}] has shape {s.shape}, expected "
                         f"{layer_dims + (head_dim,)} (layers, heads) for parameter {name} of shape {shape}")
    gamma = jnp.minimum(1.0, tau / jnp.maximum(s, 1e-30))
    if heads != head_dim:  # key of a GQA group: its exponent is 0, any per-group value works
        gamma = jnp.ones(layer_dims + (head_dim,), jnp.float32)
    bshape = [1] * len(shape)
    for i in info.layer_axes:
        bshape[i] = shape[i]
    bshape[info.head_axis] = head_dim
    return gamma.reshape(bshape)


def qk_clip(param_infos, tau: float, alpha: float) -> optax.GradientTransformationExtraArgs:
    """The QK-Clip transformation over a parameter tree described by `param_infos`; tau and alpha
    come from the config's OptimConfig.qk_clip_tau and qk_clip_alpha."""
    def init_fn(params):
        del params
        return QKClipState(jnp.zeros((), jnp.int32), jnp.ones((), jnp.float32))

    def update_fn(updates, state, params=None, *, attn_max_logits=None, **extra):
        del state, extra
        if params is None:
            raise ValueError("qk_clip needs the current params: call tx.update(grads, state, params, ...)")
        if attn_max_logits is None:
            raise ValueError("qk_clip needs the per-head max attention logits: pass attn_max_logits=... "
                             "(the forward pass's stats.max_logits) to tx.update")

        grouped = _grouped_keys(params, param_infos)

        def clip(path, u, w, info):
            if info.qk is None:
                return u
            gamma = _gamma_for(path, info, w.shape, attn_max_logits, tau)
            scale = gamma ** _exponents(info, alpha, info.stats_key in grouped)  # broadcast over head_dim
            clipped = (scale * (w + u).astype(jnp.float32)).astype(w.dtype) - w
            return jnp.where(scale < 1.0, clipped.astype(u.dtype), u)

        new_updates = jax.tree_util.tree_map_with_path(
            lambda p, u, w, i: clip(p, u, w, i), updates, params, param_infos)
        all_s = [jnp.asarray(s, jnp.float32).reshape(-1) for s in jax.tree.leaves(attn_max_logits)]
        s = jnp.concatenate(all_s) if all_s else jnp.zeros((0,), jnp.float32)
        new_state = QKClipState(jnp.sum(s > tau).astype(jnp.int32),
                                jnp.min(jnp.minimum(1.0, tau / jnp.maximum(s, 1e-30)), initial=1.0))
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
