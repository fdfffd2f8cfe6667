"""Router load balancing: Quantile Balancing, the sign rule, the sequence-wise loss, and the
monitor that makes a collapse visible. References are brute-force numpy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2jax.config import ModelConfig, MoEConfig, replace
from k2jax.model.moe import MoE, balance_histogram, quantile_bias, route, sign_bias
from k2jax.train.metrics import LoadMonitor

E, K = 16, 2
CFG = ModelConfig(d_model=32, num_layers=2, num_dense_layers=0, compute_dtype="float32",
                  moe=MoEConfig(num_experts=E, experts_per_token=K, expert_ffn_dim=16, router="sigmoid_bias"))


def _skewed_logits(key, n=4096):
    """Router logits where expert 0 is strongly preferred and the last experts almost never win."""
    return jax.random.normal(key, (n, E)) + jnp.linspace(3.0, -3.0, E)


def _loads(logits, bias):
    ids, _ = route(logits, bias, CFG.moe)
    return np.bincount(np.asarray(ids).reshape(-1), minlength=E)


def _max_over_mean(loads):
    return loads.max() / loads.mean()


def test_quantile_bias_matches_brute_force_quantiles():
    """The histogram solve equals the exact per-expert quantile of the needed bias (within a bin)."""
    logits = _skewed_logits(jax.random.key(0))
    scores = jax.nn.sigmoid(logits)
    bias = jnp.zeros(E)
    hist = balance_histogram(scores, bias, jnp.ones(scores.shape[0]), K)
    solved = np.asarray(quantile_bias(hist, bias, K))
    s = np.asarray(scores, np.float64)
    # brute force: the bias a token needs for expert j is the K-th best score among the other experts minus its own
    others = np.where(np.eye(E, dtype=bool)[None], -np.inf, s[:, None, :])  # (N, j, E) with j masked out
    kth_other = -np.sort(-others, axis=2)[:, :, K - 1]  # (N, E)
    exact = np.quantile(kth_other - s, K / E, axis=0)
    exact -= exact.mean()
    bin_width = 2.0 / 1024
    np.testing.assert_allclose(solved, exact, atol=2 * bin_width)
    assert abs(solved.mean()) < 1e-6
    # each expert's bias is solved with the others' held fixed, so on the same tokens a few solves
    # reach the fixed point where every expert takes k/E of them
    logits, bias = _skewed_logits(jax.random.key(0)), jnp.asarray(solved)
    for _ in range(3):
        bias = quantile_bias(balance_histogram(scores, bias, jnp.ones(scores.shape[0]), K), bias, K)
    loads = _loads(logits, bias)
    assert _max_over_mean(loads) < 1.02 and loads.min() / loads.mean() > 0.98, loads


@pytest.mark.parametrize("rule", ["quantile", "sign"])
def test_bias_rules_balance_a_skewed_router(rule):
    """Fresh batches from a fixed skewed router: the bias alone brings every expert near k/E."""
    bias = jnp.zeros(E)
    start = _max_over_mean(_loads(_skewed_logits(jax.random.key(0)), bias))
    steps = 1 if rule == "quantile" else 400
    for step in range(steps):
        logits = _skewed_logits(jax.random.key(step + 1))
        if rule == "quantile":
            hist = balance_histogram(jax.nn.sigmoid(logits), bias, jnp.ones(logits.shape[0]), K)
            bias = quantile_bias(hist, bias, K)
        else:
            bias = sign_bias(bias, jnp.asarray(_loads(logits, bias), jnp.float32), 0.01)
    end = _max_over_mean(_loads(_skewed_logits(jax.random.key(999)), bias))
    assert start > 5 and end < 1.25, (start, end)


def test_sequence_balance_loss_matches_formula_and_balances_by_gradient():
    """DeepSeek-V3's sequence-wise loss against numpy (with padding), then gradient descent on
    that loss alone spreads a skewed router's load."""
    cfg = replace(CFG, {"moe.aux_loss_coef": 1.0, "moe.router_balance": "none"})
    moe = MoE(cfg, nnx.Rngs(0))
    b, t = 4, 32
    x = jax.random.normal(jax.random.key(1), (b, t, cfg.d_model)) + 1.0  # a shared direction...
    moe.router[...] = moe.router[...].at[:, 0].add(0.05)  # ...that expert 0 favours
    valid = jnp.ones((b, t), bool).at[1, 20:].set(False)
    _, stats = moe(x, valid)

    logits = np.asarray(x, np.float64).reshape(-1, cfg.d_model) @ np.asarray(moe.router[...], np.float64)
    s = 1 / (1 + np.exp(-logits))
    ids = np.argsort(-s, axis=1)[:, :K]
    per_seq = []
    for row in range(b):
        keep = np.asarray(valid[row])
        rows = slice(row * t, (row + 1) * t)
        si, ii = s[rows][keep], ids[rows][keep]
        f = np.bincount(ii.reshape(-1), minlength=E) * E / (K * keep.sum())
        p = (si / si.sum(1, keepdims=True)).mean(0)
        per_seq.append(np.sum(f * p))
    assert float(stats.aux_loss) == pytest.approx(np.mean(per_seq), rel=1e-5)

    aux_grad = nnx.jit(nnx.grad(lambda m: m(x, valid)[1].aux_loss))
    before = _max_over_mean(np.asarray(stats.expert_counts))
    for _ in range(200):
        moe.router[...] = moe.router[...] - 5.0 * aux_grad(moe)["router"][...]
    after = _max_over_mean(np.asarray(moe(x, valid)[1].expert_counts))
    assert before > 3 and after < 2, (before, after)


def test_bias_steers_selection_but_never_the_combine_weights():
    logits = jax.random.normal(jax.random.key(3), (64, E))
    bias = jnp.linspace(-1.0, 1.0, E)
    ids, weights = route(logits, bias, CFG.moe)
    assert not np.array_equal(ids, route(logits, jnp.zeros(E), CFG.moe)[0])  # the bias changes the choice
    picked = jnp.take_along_axis(jax.nn.sigmoid(logits), ids, axis=1)
    np.testing.assert_allclose(weights, picked / picked.sum(1, keepdims=True), rtol=1e-6)
    probe = jax.random.normal(jax.random.key(4), weights.shape)
    grad = jax.grad(lambda b: jnp.sum(route(logits, b, CFG.moe)[1] * probe))(bias)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)  # no path from the bias to the weights


def test_load_monitor_warns_once_per_collapse_and_reports_settled_load():
    monitor = LoadMonitor(total_steps=300)
    warnings = []
    for step in range(10, 301, 10):
        ratios = [1.2, 7.5 if 60 <= step <= 200 else 1.4]
        warnings += monitor.update(step, ratios)
    assert len(warnings) == 1 and "MoE layer 1" in warnings[0] and "since step 60" in warnings[0]
    after_50 = [7.5 if 60 <= s <= 200 else 1.4 for s in range(60, 301, 10)]
    assert monitor.settled() == pytest.approx(np.mean(after_50))
    assert LoadMonitor(total_steps=20).settled() is None
