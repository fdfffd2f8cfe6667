"""Muon, QK-Clip and the MuonClip chain against independent references."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from k2jax.config import ModelConfig, OptimConfig
from k2jax.model.attention import Attention
from k2jax.model.presets import get_preset
from k2jax.model.rope import rope_tables
from k2jax.model.transformer import Transformer
from k2jax.optim import describe, make_optimizer, make_schedule, muonclip, qk_clip, qk_clip_metrics
from k2jax.optim.muon import muon_or_adamw
from k2jax.params import ParamInfo, param_info

NS = dict(ns_steps=5, ns_coeffs=(3.4445, -4.7750, 2.0315))


def _orthogonalise(g):
    """Newton-Schulz of one matrix via optax's scale_by_muon with no momentum (beta=0)."""
    tx = scale_by_muon(beta=0.0, nesterov=False, **NS)
    out, _ = tx.update(g, tx.init(g))
    return out


@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (128, 16)])
@pytest.mark.parametrize("seed", [0, 1])
def test_newton_schulz_singular_values_in_quintic_band(shape, seed):
    """Rectangular Gaussian matrices (spectrum away from 0): five steps of the (3.4445, -4.7750,
    2.0315) quintic leave every singular value in its known band of roughly [0.68, 1.2]
    (it trades exact orthogonality for speed)."""
    g = jax.random.normal(jax.random.key(seed), shape)
    s = np.linalg.svd(np.asarray(_orthogonalise(g)), compute_uv=False)
    s_in = np.linalg.svd(np.asarray(g), compute_uv=False)
    assert s_in.max() / s_in.min() > 1.5  # the input is far from orthogonal
    assert 0.67 < s.min() and s.max() < 1.2, (s.min(), s.max())


def _info(axes, in_axes, kind="matrix", **kw):
    return ParamInfo(tuple(axes), kind, tuple(in_axes), **kw)


def _tree(key=0):
    """A K2-shaped miniature: stacked experts, a scanned matrix, an embedding, a norm."""
    k = jax.random.split(jax.random.key(key), 4)
    params = {
        "experts": jax.random.normal(k[0], (4, 16, 24)),
        "layers_w": jax.random.normal(k[1], (3, 16, 8)),
        "embed": jax.random.normal(k[2], (50, 16)),
        "norm": jnp.ones((16,)),
    }
    infos = {
        "experts": _info(("experts", "embed", "expert_mlp"), ("embed",)),
        "layers_w": _info(("layers", "embed", "mlp"), ("embed",)),
        "embed": _info(("vocab", "embed"), (), kind="embedding"),
        "norm": _info(("norm",), (), kind="norm"),
    }
    return params, infos


def _one_muon_step(grad_seed):
    """Updates of one momentum-free Muon step at learning rate 1 (no decay), and the gradients."""
    params, infos = _tree()
    grads, _ = _tree(grad_seed)
    tx = muon_or_adamw(1.0, infos, weight_decay=0.0, momentum=0.0, nesterov=False, rms_scale=0.2)
    return tx.update(grads, tx.init(params), params)[0], grads


def test_stacked_matrices_are_orthogonalised_one_by_one():
    updates, grads = _one_muon_step(1)
    for name in ("experts", "layers_w"):
        for i in range(grads[name].shape[0]):
            a, b = grads[name][i].shape
            expected = -_orthogonalise(grads[name][i]) * 0.2 * np.sqrt(max(a, b))
            np.testing.assert_allclose(updates[name][i], expected, rtol=2e-3, atol=2e-4)


def test_newton_schulz_flop_count_matches_xla_cost_analysis():
    """Our closed form against XLA's own count for optax's Newton-Schulz on a stacked (4, 96, 40)
    parameter (fan-in 96 -> transposed to the wide orientation) and a (48, 80) one."""
    from k2jax.optim.muon import newton_schulz_flops

    infos = {"stack": ParamInfo(axes=("layers", "embed", "mlp"), kind="matrix", in_axes=("embed",)),
             "wide": ParamInfo(axes=("embed", "mlp"), kind="matrix", in_axes=("embed",)),
             "norm": ParamInfo(axes=("norm",), kind="norm")}
    params = {"stack": jnp.ones((4, 96, 40)), "wide": jnp.ones((48, 80)), "norm": jnp.ones((80,))}
    dims = {"stack": MuonDimensionNumbers(reduction_axis=(1,), output_axis=(2,)),
            "wide": MuonDimensionNumbers(reduction_axis=(0,), output_axis=(1,))}
    tx = scale_by_muon(beta=0.0, nesterov=False, weight_dimension_numbers=dims, **NS)
    matrices = {k: params[k] for k in dims}  # the norm is AdamW's: not counted
    counted = jax.jit(lambda g: tx.update(g, tx.init(g))[0]).lower(matrices).compile().cost_analysis()
    counted = counted[0] if isinstance(counted, list) else counted
    expected = newton_schulz_flops(infos, params)
    assert expected == pytest.approx(5 * (4 * (4 * 40**2 * 96 + 2 * 40**3) + 4 * 48**2 * 80 + 2 * 48**3))
    # XLA also counts the elementwise work (normalisation, a*X + B*X): a few percent on top
    assert expected <= counted["flops"] <= 1.1 * expected, (expected, counted["flops"])


def test_update_rms_matches_adamw_scale():
    """An orthogonal A x B matrix has RMS 1/sqrt(max(A, B)); scaled by 0.2*sqrt(max(A, B)) the
    update RMS is 0.2 * (RMS of the Newton-Schulz output * sqrt(max)), i.e. ~0.2."""
    updates, grads = _one_muon_step(2)
    for name in ("experts", "layers_w"):
        for i in range(grads[name].shape[0]):
            o = np.asarray(_orthogonalise(grads[name][i]))
            a, b = o.shape
            expected = 0.2 * np.sqrt(max(a, b)) * np.sqrt(np.mean(o**2))
            np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(updates[name][i]) ** 2)), expected, rtol=1e-3)
            assert 0.15 < expected < 0.25


def test_bfloat16_newton_schulz_runs_in_bfloat16_and_stays_close():
    """ns_dtype="bfloat16" (how K2 ran it): the iterations' matrix products are bfloat16 in the
    program; each expert's and layer's update differs from the float32 one by bfloat16 rounding
    carried through 15 products (4-6% here), while its singular values stay in the quintic's band
    (what orthogonalising is for); the AdamW branch is untouched."""
    params, infos = _tree()
    grads, _ = _tree(3)

    def muon(ns_dtype):
        return muon_or_adamw(1.0, infos, weight_decay=0.0, momentum=0.0, nesterov=False, ns_dtype=ns_dtype)

    tx16, tx32 = muon("bfloat16"), muon("float32")
    u16 = tx16.update(grads, tx16.init(params), params)[0]
    u32 = tx32.update(grads, tx32.init(params), params)[0]
    for name in ("experts", "layers_w"):
        assert u16[name].dtype == jnp.float32
        for i in range(grads[name].shape[0]):
            rel = np.linalg.norm(u16[name][i] - u32[name][i]) / np.linalg.norm(u32[name][i])
            assert 1e-3 < rel < 0.1, (name, i, rel)
            o = np.asarray(u16[name][i]) / (0.2 * np.sqrt(max(grads[name][i].shape)))  # undo the RMS match
            s = np.linalg.svd(o, compute_uv=False)
            assert 0.6 < s.min() and s.max() < 1.2, (name, i, s.min(), s.max())
    np.testing.assert_array_equal(u16["embed"], u32["embed"])
    jaxpr = str(jax.make_jaxpr(lambda g: tx16.update(g, tx16.init(params), params)[0])(grads))
    bf16_products = re.findall(r"bf16\[[\d,]*\] = dot_general", jaxpr)
    assert len(bf16_products) == 2 * 3, bf16_products  # per Muon leaf, the iteration's 3 products


def test_agrees_with_optax_contrib_muon():
    params, infos = _tree()
    hyper = dict(weight_decay=0.1, adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8)
    ours = muon_or_adamw(0.01, infos, momentum=0.95, nesterov=True, rms_scale=0.2, **hyper)
    dims = {"experts": MuonDimensionNumbers((1,), (2,)), "layers_w": MuonDimensionNumbers((1,), (2,)),
            "embed": None, "norm": None}
    # optax's AdamW branch shares Muon's nesterov flag and one weight decay; compare the matrices only
    ref = optax.contrib.muon(0.01, beta=0.95, nesterov=True, weight_decay=0.1, muon_weight_dimension_numbers=dims,
                             consistent_rms=0.2, adam_b1=0.9, adam_b2=0.95, adam_weight_decay=0.1)
    s_ours, s_ref = ours.init(params), ref.init(params)
    p_ours = p_ref = params
    for step in range(3):
        grads, _ = _tree(10 + step)
        u, s_ours = ours.update(grads, s_ours, p_ours)
        v, s_ref = ref.update(grads, s_ref, p_ref)
        p_ours, p_ref = optax.apply_updates(p_ours, u), optax.apply_updates(p_ref, v)
    for name in ("experts", "layers_w"):
        np.testing.assert_allclose(p_ours[name], p_ref[name], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- QK-Clip

ATTN = {
    "mha": ModelConfig(attention="mha", compute_dtype="float32"),
    "gqa": ModelConfig(attention="gqa", num_kv_heads=2, compute_dtype="float32"),
    "mla": ModelConfig(attention="mla", compute_dtype="float32"),
    "mla_qlora": ModelConfig(attention="mla", q_lora_rank=32, compute_dtype="float32"),
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
    boost = np.ones(cfg.num_heads, np.float32)
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
        under = [h for h in range(n_heads) if n_heads != cfg.num_heads or not over[h]]
        np.testing.assert_array_equal(a[:, under], b[:, under])
    if kind == "gqa":  # query-only rule: the shared keys never shrink
        np.testing.assert_array_equal(np.asarray(new["wk"]), np.asarray(params["wk"]))
    if kind.startswith("mla"):  # value columns of kv_b are never touched
        v0 = cfg.qk_nope_head_dim
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
    heads = {"mha": dict(num_kv_heads=4), "gqa": dict(num_kv_heads=2), "mla": {}}[kind]
    cfg = dataclasses.replace(get_preset("tiny"), attention="mla" if kind == "mla" else "gqa",
                              compute_dtype="float32", **heads)
    model = Transformer(cfg, nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    infos = param_info(nnx.state(model, nnx.Param))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    stats = model(tokens)[1]["max_logits"]
    every = np.concatenate([np.asarray(s).reshape(-1) for s in stats.values()])
    tau = float(np.median(every))  # about half the heads are clipped
    tx = qk_clip(infos, tau=tau, alpha=alpha)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params, attn_max_logits=stats)
    new = optax.apply_updates(params, updates)

    exponents = K2_EXPONENTS[kind](alpha)
    checked = set()
    for path, info in jax.tree_util.tree_leaves_with_path(infos, is_leaf=lambda x: isinstance(x, ParamInfo)):
        old_w, new_w = (np.asarray(_at(tree, path)) for tree in (params, new))
        if info.qk is None:
            np.testing.assert_array_equal(new_w, old_w)
            continue
        gamma = np.minimum(1.0, tau / np.asarray(stats[info.qk_stats]))  # (*layers, H)
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
    infos = {"wq": _info(("layers", "embed", "heads", "head_dim"), ("embed",), qk=(("q", 4),), qk_stats="s"),
             "wk": _info(("layers", "embed", "heads", "head_dim"), ("embed",), qk=(("k", 4),), qk_stats="s")}
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
    infos = {"wq": _info(("embed", "heads", "head_dim"), ("embed",), qk=(("q", 4),), qk_stats="attn")}
    params = {"wq": jnp.ones((8, 3, 4))}
    tx = qk_clip(infos, tau=1.0)
    state = tx.init(params)
    with pytest.raises(ValueError, match="attn_max_logits"):
        tx.update(params, state, params)
    with pytest.raises(ValueError, match="no entry 'attn'.*wq"):
        tx.update(params, state, params, attn_max_logits={"other": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"shape \(5,\), expected \(3,\)"):
        tx.update(params, state, params, attn_max_logits={"attn": jnp.ones(5)})


def test_muonclip_never_touches_momentum_and_jits():
    infos = {"wq": _info(("embed", "heads", "head_dim"), ("embed",), qk=(("q", 4),), qk_stats="a"),
             "wk": _info(("embed", "heads", "head_dim"), ("embed",), qk=(("k", 4),), qk_stats="a")}
    params = {n: jax.random.normal(jax.random.key(i), (8, 2, 4)) for i, n in enumerate(infos)}
    grads = jax.tree.map(jnp.ones_like, params)
    clipped, plain = muonclip(1e-2, infos, tau=1.0), muonclip(1e-2, infos, clip=False)
    hot = {"a": jnp.asarray([50.0, 0.5])}
    step = lambda tx: jax.jit(lambda s: tx.update(grads, s, params, attn_max_logits=hot))  # noqa: E731
    (_, s1), (_, s2) = step(clipped)(clipped.init(params)), step(plain)(plain.init(params))
    mu1 = [x for x in jax.tree.leaves(s1) if x.shape == (8, 2, 4)]
    mu2 = [x for x in jax.tree.leaves(s2) if x.shape == (8, 2, 4)]
    assert mu1 and all(np.array_equal(a, b) for a, b in zip(mu1, mu2))
    assert int(qk_clip_metrics(s1)["clipped_heads"]) == 1


@pytest.mark.parametrize("name", ["muonclip", "muon", "adamw"])
def test_factory_variants_accept_the_same_step(name):
    params, infos = _tree()
    tx = make_optimizer(OptimConfig(name=name, warmup_steps=2), infos, total_steps=10)
    state = tx.init(params)
    updates, state = jax.jit(lambda s: tx.update(params, s, params, attn_max_logits={}))(state)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))
    rules = {row[0]: row[2] for row in describe(infos, name)}
    assert rules["embed"] == "adamw" and rules["norm"] == "adamw_no_decay"
    assert rules["experts"].startswith("muon") == (name != "adamw")


def test_schedules():
    cfg = OptimConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    wsd = make_schedule(dataclasses.replace(cfg, schedule="wsd"), 100)
    cosine = make_schedule(dataclasses.replace(cfg, schedule="cosine"), 100)
    assert float(wsd(0)) == 0.0 and float(wsd(5)) == pytest.approx(0.5)
    assert float(wsd(10)) == pytest.approx(1.0) and float(wsd(79)) == pytest.approx(1.0)  # stable phase
    assert float(wsd(100)) == pytest.approx(0.1) and float(cosine(100)) == pytest.approx(0.1)
    assert float(cosine(55)) == pytest.approx(0.55, abs=1e-2)  # halfway down the cosine
