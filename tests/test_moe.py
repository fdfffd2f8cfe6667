"""MoE routing and dispatch against per-token numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2jax.config import ExecutionConfig, ModelConfig, MoEConfig, replace
from k2jax.model.moe import MoE, RouterBias, route, sign_bias
from k2jax.params import param_info

CFG = ModelConfig(d_model=32, compute_dtype="float32",
                  moe=MoEConfig(num_experts=8, experts_per_token=2, expert_ffn_dim=16, num_shared_experts=1,
                                routed_scaling_factor=2.5, capacity_factor=8.0))
B, T = 2, 10


def _np_route(logits, bias, cfg):
    """Per-token reference of DeepSeek-V3 group-limited routing / softmax top-k."""
    ids, weights = [], []
    for row in np.asarray(logits, np.float64):
        if cfg.moe.router == "sigmoid_bias":
            scores = 1 / (1 + np.exp(-row))
            choice = scores + np.asarray(bias)
            per = cfg.moe.num_experts // cfg.moe.num_expert_groups
            groups = choice.reshape(cfg.moe.num_expert_groups, per)
            gscore = np.sort(groups, axis=1)[:, -min(2, per):].sum(1)
            keep = np.argsort(-gscore, kind="stable")[:cfg.moe.top_groups]
            masked = np.full_like(choice, -np.inf)
            for g in keep:
                masked[g * per:(g + 1) * per] = choice[g * per:(g + 1) * per]
            top = np.argsort(-masked, kind="stable")[:cfg.moe.experts_per_token]
            w = scores[top]
        else:
            p = np.exp(row - row.max())
            p /= p.sum()
            top = np.argsort(-p, kind="stable")[:cfg.moe.experts_per_token]
            w = p[top]
        if cfg.moe.norm_topk_prob:
            w = w / w.sum()
        ids.append(top)
        weights.append(w * cfg.moe.routed_scaling_factor)
    return np.asarray(ids), np.asarray(weights)


@pytest.mark.parametrize("router, groups, top_groups", [("sigmoid_bias", 1, 1), ("sigmoid_bias", 4, 2),
                                                        ("sigmoid_bias", 2, 1), ("softmax_topk", 1, 1)])
def test_route_matches_reference(router, groups, top_groups):
    cfg = replace(CFG, {"moe.router": router, "moe.num_expert_groups": groups, "moe.top_groups": top_groups})
    logits = jax.random.normal(jax.random.key(0), (64, cfg.moe.num_experts)) * 2
    bias = jax.random.normal(jax.random.key(1), (cfg.moe.num_experts,)) * 0.3
    ids, w = route(logits, bias, cfg.moe)
    ref_ids, ref_w = _np_route(logits, bias, cfg)
    np.testing.assert_array_equal(np.sort(np.asarray(ids), 1), np.sort(ref_ids, 1))
    order, ref_order = np.argsort(np.asarray(ids), 1), np.argsort(ref_ids, 1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, 1),
                               np.take_along_axis(ref_w, ref_order, 1), rtol=1e-5)


def _silu(x):
    return x / (1 + np.exp(-x))


def _np_moe(p, cfg, x, bias):
    """Naive loop: for each token, sum weight * SwiGLU_e(x) over its experts, plus the shared expert."""
    x = np.asarray(x, np.float64).reshape(-1, cfg.d_model)
    logits = x @ np.asarray(p["router"], np.float64)
    ids, w = _np_route(logits, bias, cfg)
    g, u, o = (np.asarray(p[n], np.float64) for n in ("wi_gate", "wi_up", "wo"))
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for e, weight in zip(ids[n], w[n]):
            out[n] += weight * (_silu(x[n] @ g[e]) * (x[n] @ u[e])) @ o[e]
    sh = {k: np.asarray(v, np.float64) for k, v in p["shared"].items()}
    out += (_silu(x @ sh["gate"]) * (x @ sh["up"])) @ sh["down"]
    return out, ids


@pytest.mark.parametrize("dispatch, grouped_matmul", [("ragged", "ragged_dot"), ("ragged", "tiled"),
                                                     ("ragged", "megablox"), ("capacity", "auto")])
@pytest.mark.parametrize("groups", [1, 2])
def test_dispatch_matches_naive_loop(dispatch, grouped_matmul, groups):
    cfg = replace(CFG, {"moe.dispatch": dispatch, "moe.num_expert_groups": groups})
    moe = MoE(cfg, nnx.Rngs(0), ExecutionConfig(grouped_matmul=grouped_matmul))
    moe.bias.value = jax.random.normal(jax.random.key(7), (cfg.moe.num_experts,)) * 0.01
    x = jax.random.normal(jax.random.key(2), (B, T, cfg.d_model))
    valid = jnp.ones((B, T), bool).at[1, 7:].set(False)
    y, stats = nnx.jit(lambda m, x, v: m(x, v))(moe, x, valid)
    ref, ids = _np_moe(nnx.to_pure_dict(nnx.state(moe, nnx.Param)), cfg, x, moe.bias.value)
    v = np.asarray(valid).reshape(-1)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, cfg.d_model)[v], ref[v], rtol=2e-4, atol=2e-5)
    counts = np.bincount(ids[v].reshape(-1), minlength=cfg.moe.num_experts)
    np.testing.assert_array_equal(np.asarray(stats.expert_counts), counts)  # padding excluded
    assert float(stats.expert_counts.sum()) == v.sum() * cfg.moe.experts_per_token
    assert float(stats.dropped_fraction) == 0.0


@pytest.mark.parametrize("group_sizes", [[50, 0, 100, 70, 1, 79], [0] * 6, [300, 0, 0, 0, 0, 0], [10, 20, 0, 5, 99, 3]])
def test_tiled_grouped_matmul_equals_ragged_dot(group_sizes):
    """Empty groups, one full group, and rows past every group (sum 137 < 300: they come back zero)."""
    from k2jax.kernels.grouped_matmul import _swiglu_ragged, _swiglu_tiled

    keys = jax.random.split(jax.random.key(0), 4)
    args = (jax.random.normal(keys[0], (300, 16)), jax.random.normal(keys[1], (6, 16, 8)),
            jax.random.normal(keys[2], (6, 16, 8)), jax.random.normal(keys[3], (6, 8, 16)))
    sizes = jnp.asarray(group_sizes, jnp.int32)
    tiled = lambda *a: _swiglu_tiled(*a, sizes, tile=16)  # noqa: E731
    ragged = lambda *a: _swiglu_ragged(*a, sizes)  # noqa: E731
    np.testing.assert_allclose(np.asarray(tiled(*args)), np.asarray(ragged(*args)), rtol=1e-5, atol=2e-4)
    assert np.all(np.asarray(tiled(*args))[int(sizes.sum()):] == 0)
    probe = jax.random.normal(jax.random.key(5), (300, 16))  # linear loss: no float32 amplification
    grads = [jax.grad(lambda *a: jnp.sum(f(*a) * probe), argnums=(0, 1, 2, 3))(*args) for f in (tiled, ragged)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows, group_sizes", [(8, [2, 0, 3, 1, 0, 1]), (8, [0, 0, 0, 0, 0, 5]), (20, [4, 1, 0, 6, 2, 3]),
                                               (40, [9, 1, 0, 14, 2, 7])])
def test_tiled_grouped_matmul_with_few_rows_per_expert_equals_ragged_dot(rows, group_sizes):
    """Decoding's shapes: fewer than two rows per expert (each row gathers its expert's weights) and a few
    (tiles shrink to the rows per expert); rows past every group come back zero."""
    from k2jax.kernels.grouped_matmul import _swiglu_ragged, _swiglu_tiled

    keys = jax.random.split(jax.random.key(1), 4)
    args = (jax.random.normal(keys[0], (rows, 16)), jax.random.normal(keys[1], (6, 16, 8)),
            jax.random.normal(keys[2], (6, 16, 8)), jax.random.normal(keys[3], (6, 8, 16)))
    sizes = jnp.asarray(group_sizes, jnp.int32)
    got = np.asarray(_swiglu_tiled(*args, sizes))
    np.testing.assert_allclose(got, np.asarray(_swiglu_ragged(*args, sizes)), rtol=1e-5, atol=2e-4)
    assert np.all(got[int(sizes.sum()):] == 0)


@pytest.mark.parametrize("group_sizes", [[25, 0, 30, 20, 1, 24], [0] * 6, [120, 0, 0, 0, 0, 0]])
def test_megablox_grouped_matmul_equals_ragged_dot_and_tiled(group_sizes):
    """JAX's megablox kernels (TPU interpret mode: unwritten memory reads NaN) with 16-row tiles:
    groups that start and end inside tiles, empty groups, one group of every row, rows past every
    group (they come back zero and take no gradient); values and gradients w.r.t. x and the three
    weight stacks."""
    from k2jax.kernels.grouped_matmul import _swiglu_megablox, _swiglu_ragged, _swiglu_tiled

    keys = jax.random.split(jax.random.key(0), 4)
    args = (jax.random.normal(keys[0], (120, 16)), jax.random.normal(keys[1], (6, 16, 8)),
            jax.random.normal(keys[2], (6, 16, 8)), jax.random.normal(keys[3], (6, 8, 16)))
    sizes = jnp.asarray(group_sizes, jnp.int32)
    probe = jax.random.normal(jax.random.key(5), (120, 16))  # nonzero on the rows past the groups too

    def value_and_grads(f):  # y and the gradients of a linear loss, in one program
        def loss(*a):
            y = f(*a, sizes)
            return jnp.sum(y * probe), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
        return np.asarray(y), [np.asarray(g) for g in grads]

    y, grads = value_and_grads(functools.partial(_swiglu_megablox, tm=16))
    assert np.all(y[int(sizes.sum()):] == 0) and all(np.all(np.isfinite(g)) for g in grads)
    for ref in (_swiglu_ragged, functools.partial(_swiglu_tiled, tile=16)):
        ref_y, ref_grads = value_and_grads(ref)
        np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=2e-4)
        for a, b in zip(grads, ref_grads):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_megablox_pads_rows_and_dims_and_runs_bfloat16(monkeypatch):
    """Rows that fill no whole tile (37 of 48), and D, F the kernels would not take whole (forced
    here by a small MEGABLOX_MAX_WHOLE: padded to 128 with zeros and sliced off); bfloat16 in and
    out, accumulated in float32: close to the float32 ragged dot of the same bfloat16 numbers."""
    import k2jax.kernels.grouped_matmul as grouped

    monkeypatch.setattr(grouped, "MEGABLOX_MAX_WHOLE", 8)
    assert grouped._megablox_padded_dim(20) == 128 and grouped._megablox_padded_dim(256) == 256
    keys = jax.random.split(jax.random.key(1), 4)
    args = tuple(jax.random.normal(kk, shape).astype(jnp.bfloat16) for kk, shape in
                 zip(keys, [(37, 20), (3, 20, 12), (3, 20, 12), (3, 12, 20)]))
    sizes = jnp.asarray([9, 0, 21], jnp.int32)

    def loss(*a):
        y = grouped._swiglu_megablox(*a, sizes, tm=16)
        return jnp.sum(y.astype(jnp.float32)), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    f32 = tuple(a.astype(jnp.float32) for a in args)
    ref = grouped._swiglu_ragged(*f32, sizes)
    ref_grads = jax.grad(lambda *a: jnp.sum(grouped._swiglu_ragged(*a, sizes)), argnums=(0, 1, 2, 3))(*f32)
    assert y.dtype == jnp.bfloat16 and y.shape == (37, 20)
    y, ref = np.asarray(y, np.float32), np.asarray(ref)  # bfloat16 rounding of h (and y): under 1%
    assert np.linalg.norm(y - ref) < 1e-2 * np.linalg.norm(ref) and np.all(y[30:] == 0)
    for g, r, a in zip(grads, ref_grads, args):  # and of the cotangents
        assert g.dtype == jnp.bfloat16 and g.shape == a.shape
        assert np.linalg.norm(np.asarray(g, np.float32) - r) < 2e-2 * np.linalg.norm(r)


def test_megablox_is_picked_and_compiled_for_tpu():
    """auto: tiled on CPU, megablox on TPU, ragged_dot on GPU. Traced for TPU on this CPU, the
    grouped SwiGLU and its gradient are Mosaic kernels (not interpreted), with tiles the presets'
    widths allow (the whole dim, or 128..512 dividing it) and rows tiles of 128..512."""
    from k2jax.kernels.grouped_matmul import _megablox_row_tile, _megablox_tile, _swiglu_megablox, swiglu_grouped
    from k2jax.kernels.select import grouped_matmul_impl
    from k2jax.platform import lowering_for

    assert grouped_matmul_impl("auto") == "tiled"
    for platform, impl in [("tpu", "megablox"), ("cuda", "ragged_dot"), ("cpu", "tiled")]:
        with lowering_for(platform):
            assert grouped_matmul_impl("auto") == impl
    assert grouped_matmul_impl("megablox") == "megablox"
    assert swiglu_grouped("megablox") is _swiglu_megablox
    assert [_megablox_tile(n) for n in (64, 144, 584, 880, 512, 2048, 3072, 7168)] == [
        64, 144, 584, 880, 512, 512, 512, 512]
    assert [_megablox_row_tile(m, 64) for m in (40, 8192, 16384, 32768, 65536)] == [40, 128, 256, 512, 512]

    keys = jax.random.split(jax.random.key(2), 4)
    args = tuple(jax.random.normal(kk, shape).astype(jnp.bfloat16) for kk, shape in
                 zip(keys, [(256, 128), (4, 128, 144), (4, 128, 144), (4, 144, 128)]))
    sizes = jnp.asarray([100, 0, 60, 50], jnp.int32)
    loss = lambda *a: jnp.sum(_swiglu_megablox(*a, sizes).astype(jnp.float32) ** 2)  # noqa: E731
    with lowering_for("tpu"):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text and "callback" not in text
    # where GSPMD would partition it (no shard_map around it), which it cannot for a Mosaic kernel: ragged_dot
    with lowering_for("tpu"), jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",))):
        jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args))
    assert "ragged_dot" in jaxpr and "pallas_call" not in jaxpr


def test_small_capacity_drops_and_reports_it():
    cfg = replace(CFG, {"moe.dispatch": "capacity", "moe.capacity_factor": 0.25})
    moe = MoE(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (B, T, cfg.d_model))
    _, stats = moe(x, jnp.ones((B, T), bool))
    assert 0.5 < float(stats.dropped_fraction) < 1.0  # capacity holds 1/4 of the assignments


@pytest.mark.parametrize("grouped_matmul", ["ragged_dot", "tiled", "megablox"])
def test_ragged_gradients_match_dense_reference(grouped_matmul):
    """Gradient through the grouped matmul equals the gradient of computing every expert for every token."""
    cfg = CFG
    moe = MoE(cfg, nnx.Rngs(0), ExecutionConfig(grouped_matmul=grouped_matmul))
    x = jax.random.normal(jax.random.key(4), (B, T, cfg.d_model))
    valid = jnp.ones((B, T), bool)

    def dense(m, x):
        xf = x.reshape(-1, cfg.d_model)
        ids, w = route(xf @ m.router[...], m.bias[...], cfg.moe)
        gates = jnp.zeros((xf.shape[0], cfg.moe.num_experts)).at[jnp.arange(xf.shape[0])[:, None], ids].add(w)
        h = jax.nn.silu(jnp.einsum("nd,edf->enf", xf, m.wi_gate[...])) * jnp.einsum("nd,edf->enf", xf, m.wi_up[...])
        y = jnp.einsum("enf,efd->end", h, m.wo[...])
        return jnp.einsum("end,ne->nd", y, gates) + m.shared(xf)

    g_ragged = nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.sin(m(x, valid)[0]))))(moe)
    g_dense = nnx.grad(lambda m: jnp.sum(jnp.sin(dense(m, x))))(moe)
    for name in ("wi_gate", "wi_up", "wo", "router"):
        np.testing.assert_allclose(np.asarray(getattr(g_ragged, name)[...]), np.asarray(getattr(g_dense, name)[...]),
                                   rtol=1e-4, atol=1e-6)


def test_router_losses_match_formulas():
    cfg = replace(CFG, {"moe.router": "softmax_topk", "moe.aux_loss_coef": 0.01, "moe.router_z_loss_coef": 0.001})
    moe = MoE(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (B, T, cfg.d_model))
    valid = jnp.ones((B, T), bool).at[0, 8:].set(False)
    _, stats = moe(x, valid)
    v = np.asarray(valid).reshape(-1)
    logits = (np.asarray(x, np.float64).reshape(-1, cfg.d_model) @ np.asarray(moe.router[...], np.float64))[v]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    ids, _ = _np_route(logits, np.zeros(cfg.moe.num_experts), cfg)
    f = np.bincount(ids.reshape(-1), minlength=cfg.moe.num_experts) / (v.sum() * cfg.moe.experts_per_token)
    aux = cfg.moe.num_experts * np.sum(f * probs.mean(0))
    z = np.mean(np.log(np.exp(logits).sum(1)) ** 2)
    assert float(stats.aux_loss) == pytest.approx(0.01 * aux, rel=1e-4)
    assert float(stats.z_loss) == pytest.approx(0.001 * z, rel=1e-4)


def test_bias_update_direction_and_not_a_param():
    bias = jnp.zeros((2, 4))
    counts = jnp.asarray([[10.0, 2.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    new = np.asarray(sign_bias(bias, counts, 0.1))
    np.testing.assert_allclose(new[0], [-0.1, 0.1, 0.1, 0.1])  # mean load 5: only expert 0 is overloaded
    np.testing.assert_array_equal(new[1], 0.0)  # perfectly balanced: unchanged
    moe = MoE(CFG, nnx.Rngs(0))
    assert isinstance(moe.bias, RouterBias) and not isinstance(moe.bias, nnx.Param)
    assert "bias" not in nnx.to_pure_dict(nnx.state(moe, nnx.Param))
    param_info(nnx.state(moe, nnx.Param))  # every trained parameter satisfies the metadata contract
