"""QK-Clip (k2jax/optim/qk_clip.py) on attention layers, the real model and scanned stacks; MuonClip's chain."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from param_trees import make_info

from k2jax.config import AttentionConfig, ModelConfig, OptimConfig, get_preset, replace
from k2jax.model.attention import Attention
from k2jax.model.rope import rope_tables
from k2jax.model.transformer import Transformer
from k2jax.optim import muonclip, qk_clip, qk_clip_metrics
from k2jax.params import is_info, param_info

ATTN = {
    "mha": ModelConfig(attention=AttentionConfig(kind="mha"), compute_dtype="float32"),
    "gqa": ModelConfig(attention=AttentionConfig(kind="gqa", num_kv_heads=2), compute_dtype="float32"),
    "mla": ModelConfig(attention=AttentionConfig(kind="mla"), compute_dtype="float32"),
    "mla_qlora": ModelConfig(attention=AttentionConfig(kind="mla", q_lora_rank=32), compute_dtype="float32"),
}
B, T = 2, 12


def _max_logits(attn, cfg, x, seg):
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    return attn(x, rope_tables(cfg, pos), seg)[1]


@pytest.mark.parametrize("kind", list(ATTN))
def test_qk_clip_caps_heads_at_tau_and_leaves_others_bitwise(kind):
    cfg = ATTN[kind]
    attn = Attention(cfg, stats_key="layer", rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(attn, nnx.Param))
    infos = param_info(nnx.state(attn, nnx.Param))
    # blow up heads 0 and 2 (their query columns) so their logits exceed tau
    boost = np.ones(cfg.attention.num_heads, np.float32)
    boost[[0, 2]] = 40.0
    q_name = "wq_b" if "wq_b" in params else "wq"
    params[q_name] = params[q_name] * boost[None, :, None]
    nnx.update(attn, params)
    x = jax.random.normal(jax.random.key(3), (B, T, cfg.d_model)) * 3
    seg = jnp.ones((B, T), jnp.int32)
    s = _max_logits(attn, cfg, x, seg)
    tau = float(np.sort(np.asarray(s))[-3]) * 1.01  # between the boosted heads and the rest
    over = np.asarray(s) > tau
    assert over.sum() == 2, s

    tx = qk_clip(infos, tau=tau, alpha=0.5)
    zeros = jax.tree.map(jnp.zeros_like, params)  # learning rate 0: the update itself is zero
    updates, state = tx.update(zeros, tx.init(params), params, attn_max_logits={"layer": s})
    new = optax.apply_updates(params, updates)
    nnx.update(attn, new)
    s_new = np.asarray(_max_logits(attn, cfg, x, seg))
    np.testing.assert_allclose(s_new[over], tau, rtol=1e-4)
    np.testing.assert_array_equal(s_new[~over], np.asarray(s)[~over])
    assert int(state.clipped_heads) == 2 and float(state.min_gamma) < 1

    # untouched: heads under tau bitwise, values, the shared rotary key, the output projection
    for name in params:
        if name in ("wo", "wv", "wkv_a", "wq_a") or "norm" in name:
            np.testing.assert_array_equal(new[name] if not isinstance(new[name], dict) else 0,
                                          params[name] if not isinstance(params[name], dict) else 0)
    head_axis = 1
    for name in params:
        if isinstance(params[name], dict) or infos[name].qk is None:
            continue
        a, b = np.asarray(new[name]), np.asarray(params[name])
        n_heads = a.shape[head_axis]
        under = [h for h in range(n_heads) if n_heads != cfg.attention.num_heads or not over[h]]
        np.testing.assert_array_equal(a[:, under], b[:, under])
    if kind == "gqa":  # query-only rule: the shared keys never shrink
        np.testing.assert_array_equal(np.asarray(new["wk"]), np.asarray(params["wk"]))
    if kind.startswith("mla"):  # value columns of kv_b are never touched
        v0 = cfg.attention.qk_nope_head_dim
        np.testing.assert_array_equal(np.asarray(new["wkv_b"])[..., v0:], np.asarray(params["wkv_b"])[..., v0:])


# K2's exponent of gamma per projection role: MHA splits the clip between query and key by
# alpha, GQA clips only the query (its keys are shared), MLA keeps the shared rotary key whole.
K2_EXPONENTS = {
    "mha": lambda a: {"q": a, "k": 1 - a},
    "gqa": lambda a: {"q": 1.0, "k": 0.0},
    "mla": lambda a: {"q_nope": a, "k_nope": 1 - a, "q_rope": 1.0, "v": 0.0},
}


@pytest.mark.parametrize("kind,alpha", [("mha", 0.5), ("mha", 0.25), ("gqa", 0.5), ("mla", 0.5), ("mla", 0.3)])
def test_qk_clip_scales_the_real_models_weights_by_k2s_exponents(kind, alpha):
    """Built from the Transformer itself (scanned dense and MoE stacks): after a zero update,
    every query/key column of a clipped head equals its old value times gamma ** exponent."""
    heads = {"mha": {"attention.num_kv_heads": 4}, "gqa": {"attention.num_kv_heads": 2}, "mla": {}}[kind]
    cfg = replace(get_preset("tiny"), {"attention.kind": "mla" if kind == "mla" else "gqa",
                                       "compute_dtype": "float32", **heads})
    model = Transformer(cfg, nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    infos = param_info(nnx.state(model, nnx.Param))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    stats = model(tokens)[1].max_logits
    every = np.concatenate([np.asarray(s).reshape(-1) for s in stats.values()])
    tau = float(np.median(every))  # about half the heads are clipped
    tx = qk_clip(infos, tau=tau, alpha=alpha)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params, attn_max_logits=stats)
    new = optax.apply_updates(params, updates)

    exponents = K2_EXPONENTS[kind](alpha)
    checked = set()
    for path, info in jax.tree_util.tree_leaves_with_path(infos, is_leaf=is_info):
        old_w, new_w = (np.asarray(_at(tree, path)) for tree in (params, new))
        if info.qk is None:
            np.testing.assert_array_equal(new_w, old_w)
            continue
        gamma = np.minimum(1.0, tau / np.asarray(stats[info.stats_key]))  # (*layers, H)
        n_heads = old_w.shape[info.head_axis]
        column = np.concatenate([np.full(w, exponents[role]) for role, w in info.qk])  # (head_dim,)
        if n_heads != gamma.shape[-1]:  # GQA's shared key heads
            assert not column.any()
            expected = old_w
        else:
            g = np.expand_dims(gamma, tuple(range(gamma.ndim - 1, info.head_axis)))[..., None]
            expected = old_w * g ** column
        np.testing.assert_allclose(new_w, expected, rtol=2e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
        checked.update(role for role, _ in info.qk)
    assert checked == set(exponents)
    assert (every > tau).any() and (every < tau).any()


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_qk_clip_with_scanned_layers_and_real_update():
    """(L, H) stats against stacked parameters, and the clip applied after a non-zero update."""
    infos = {"wq": make_info(("layers", "embed", "heads", "head_dim"), ("embed",), qk=(("q", 4),), stats_key="s"),
             "wk": make_info(("layers", "embed", "heads", "head_dim"), ("embed",), qk=(("k", 4),), stats_key="s")}
    params = {n: jax.random.normal(jax.random.key(i), (2, 8, 3, 4)) for i, n in enumerate(infos)}
    updates = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
    s = jnp.asarray([[50.0, 200.0, 100.0], [400.0, 10.0, 100.0]])
    tx = qk_clip(infos, tau=100.0, alpha=0.5)
    out, _ = tx.update(updates, tx.init(params), params, attn_max_logits={"s": s})
    gamma = np.minimum(1.0, 100.0 / np.asarray(s))
    for n in infos:
        expected = (np.asarray(params[n]) + 0.1) * np.sqrt(gamma)[:, None, :, None]
        np.testing.assert_allclose(np.asarray(params[n] + out[n]), expected, rtol=1e-6, atol=1e-6)
        keep = gamma >= 1.0
        np.testing.assert_array_equal(np.asarray(out[n])[:, :, :][keep[:, None, :].repeat(8, 1)],
                                      np.asarray(updates[n])[keep[:, None, :].repeat(8, 1)])


def test_qk_clip_rejects_missing_or_misshaped_stats():
    infos = {"wq": make_info(("embed", "heads", "head_dim"), ("embed",), qk=(("q", 4),), stats_key="attn")}
    params = {"wq": jnp.ones((8, 3, 4))}
    tx = qk_clip(infos, tau=1.0, alpha=0.5)
    state = tx.init(params)
    with pytest.raises(ValueError, match="attn_max_logits"):
        tx.update(params, state, params)
    with pytest.raises(ValueError, match="no entry 'attn'.*wq"):
        tx.update(params, state, params, attn_max_logits={"other": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"shape \(5,\), expected \(3,\)"):
        tx.update(params, state, params, attn_max_logits={"attn": jnp.ones(5)})


def test_muonclip_never_touches_momentum_and_jits():
    infos = {"wq": make_info(("embed", "heads", "head_dim"), ("embed",), qk=(("q", 4),), stats_key="a"),
             "wk": make_info(("embed", "heads", "head_dim"), ("embed",), qk=(("k", 4),), stats_key="a")}
    params = {n: jax.random.normal(jax.random.key(i), (8, 2, 4)) for i, n in enumerate(infos)}
    grads = jax.tree.map(jnp.ones_like, params)
    clipped, plain = muonclip(1e-2, infos, OptimConfig(qk_clip_tau=1.0)), muonclip(1e-2, infos, clip=False)
    hot = {"a": jnp.asarray([50.0, 0.5])}
    step = lambda tx: jax.jit(lambda s: tx.update(grads, s, params, attn_max_logits=hot))  # noqa: E731
    (_, s1), (_, s2) = step(clipped)(clipped.init(params)), step(plain)(plain.init(params))
    mu1 = [x for x in jax.tree.leaves(s1) if x.shape == (8, 2, 4)]
    mu2 = [x for x in jax.tree.leaves(s2) if x.shape == (8, 2, 4)]
    assert mu1 and all(np.array_equal(a, b) for a, b in zip(mu1, mu2))
    assert int(qk_clip_metrics(s1)["clipped_heads"]) == 1
