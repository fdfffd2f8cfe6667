"""Attention and RoPE: max-logit statistics against a float64 numpy brute force, masks, YaRN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2jax.config import AttentionConfig, ExecutionConfig, ModelConfig, YarnConfig, replace
from k2jax.model.attention import Attention
from k2jax.model.rope import apply_rope, inv_frequencies, rope_tables, softmax_scale
from packing import packed_layout

BASE = ModelConfig(d_model=64, compute_dtype="float32", attention=AttentionConfig(
    num_heads=4, num_kv_heads=4, head_dim=16, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16))
YARN = YarnConfig(factor=4.0, original_max_position=8, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
KINDS = {
    "mha": replace(BASE, {"attention.kind": "mha"}),
    "gqa": replace(BASE, {"attention.kind": "gqa", "attention.num_kv_heads": 2}),
    "mla": replace(BASE, {"attention.kind": "mla"}),
    "mla_qlora": replace(BASE, {"attention.kind": "mla", "attention.q_lora_rank": 24}),
    "mla_yarn": replace(BASE, {"attention.kind": "mla", "attention.yarn": YARN}),
}
B, T = 2, 12


# ---------------------------------------------------------------- float64 reference


def _np_rope(x, pos, dim, cfg):
    inv, amp = inv_frequencies(dim, cfg.attention.rope_theta, cfg.attention.yarn)
    ang = pos[..., None].astype(np.float64) * inv
    cos, sin = np.cos(ang)[:, :, None] * amp, np.sin(ang)[:, :, None] * amp
    h = dim // 2
    return np.concatenate([x[..., :h] * cos - x[..., h:] * sin, x[..., h:] * cos + x[..., :h] * sin], -1)


def _np_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _np_logits(p, cfg, x, pos):
    """(B, H, T, S) scaled logits computed independently in float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    if cfg.attention.kind == "mla":
        nope, r = cfg.attention.qk_nope_head_dim, cfg.attention.qk_rope_head_dim
        if cfg.attention.q_lora_rank:
            q = np.einsum("btc,chd->bthd", _np_rms(x @ p["wq_a"], p["q_norm"]["scale"], cfg.rms_eps), p["wq_b"])
        else:
            q = np.einsum("btd,dhk->bthk", x, p["wq"])
        q = np.concatenate([q[..., :nope], _np_rope(q[..., nope:], pos, r, cfg)], -1)
        kv_a = x @ p["wkv_a"]
        latent = _np_rms(kv_a[..., :cfg.attention.kv_lora_rank], p["kv_norm"]["scale"], cfg.rms_eps)
        k_nope = np.einsum("btc,chd->bthd", latent, p["wkv_b"])[..., :nope]
        k_rope = _np_rope(kv_a[:, :, None, cfg.attention.kv_lora_rank:], pos, r, cfg)
        k = np.concatenate([k_nope, np.broadcast_to(k_rope, k_nope.shape[:3] + (r,))], -1)
    else:
        q = _np_rope(np.einsum("btd,dhk->bthk", x, p["wq"]), pos, cfg.attention.head_dim, cfg)
        k = _np_rope(np.einsum("btd,dgk->btgk", x, p["wk"]), pos, cfg.attention.head_dim, cfg)
        k = np.repeat(k, cfg.attention.num_heads // cfg.attention.num_kv_heads, axis=2)
    return np.einsum("bthd,bshd->bhts", q, k) * softmax_scale(cfg)


def _np_mask(seg):
    t = seg.shape[1]
    return np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)


def _packed(rows):
    return packed_layout(rows, T)


@pytest.fixture(scope="module", params=[(kind, impl) for kind in KINDS for impl in ("plain", "flash")],
                ids=lambda p: "-".join(p))
def setup(request):
    kind, impl = request.param  # the flash kernel runs interpreted on CPU: same brute-force checks
    cfg = KINDS[kind]
    attn = Attention(cfg, stats_key="s", rngs=nnx.Rngs(0), execution=ExecutionConfig(attention_impl=impl))
    params = nnx.to_pure_dict(nnx.state(attn, nnx.Param))
    # larger weights so logits are O(1..10) and the max is well separated from rounding
    nnx.update(attn, jax.tree.map(lambda a: a * 8 if a.ndim > 1 else a, params))
    fwd = nnx.jit(lambda m, x, pos, seg: m(x, rope_tables(cfg, pos), seg))
    return cfg, attn, fwd


@pytest.mark.parametrize("layout", [[[T], [T]], [[5, 7], [9]], [[3, 3, 6], [12]]])
def test_max_logit_equals_brute_force(setup, layout):
    cfg, attn, fwd = setup
    pos, seg = _packed(layout)
    x = jax.random.normal(jax.random.key(1), (B, T, cfg.d_model))
    y, s = fwd(attn, x, jnp.asarray(pos), jnp.asarray(seg))
    assert y.shape == (B, T, cfg.d_model) and y.dtype == jnp.float32 and s.shape == (cfg.attention.num_heads,)
    logits = _np_logits(nnx.to_pure_dict(nnx.state(attn, nnx.Param)), cfg, x, pos)
    expected = np.where(_np_mask(seg)[:, None], logits, -np.inf).max(axis=(0, 2, 3))
    np.testing.assert_allclose(np.asarray(s), expected, rtol=2e-5, atol=2e-5)
    assert np.isfinite(np.asarray(y)).all()  # padding rows included


def test_padding_and_other_documents_do_not_count(setup):
    """Put huge inputs only where they must not count: in padding; the statistic must not move."""
    cfg, attn, fwd = setup
    pos, seg = _packed([[6], [8]])
    x = jax.random.normal(jax.random.key(2), (B, T, cfg.d_model))
    _, s = fwd(attn, x, jnp.asarray(pos), jnp.asarray(seg))
    loud = jnp.where(jnp.asarray(seg)[..., None] == 0, 100.0 * x, x)
    y2, s2 = fwd(attn, loud, jnp.asarray(pos), jnp.asarray(seg))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s2))
    assert np.isfinite(np.asarray(y2)).all()


def test_causal_and_documents_isolated(setup):
    cfg, attn, fwd = setup
    pos, seg = _packed([[5, 7], [12]])
    x = jax.random.normal(jax.random.key(3), (B, T, cfg.d_model))
    y, _ = fwd(attn, x, jnp.asarray(pos), jnp.asarray(seg))
    # change position 8: row 0 positions < 8 (both documents) and row 1 positions < 8 are unchanged
    x2 = x.at[:, 8].add(1.0)
    y2, _ = fwd(attn, x2, jnp.asarray(pos), jnp.asarray(seg))
    np.testing.assert_array_equal(np.asarray(y[:, :8]), np.asarray(y2[:, :8]))
    # change document 1 of row 0: document 2 of row 0 is bitwise unchanged
    x3 = x.at[0, :5].multiply(-2.0)
    y3, _ = fwd(attn, x3, jnp.asarray(pos), jnp.asarray(seg))
    np.testing.assert_array_equal(np.asarray(y[0, 5:]), np.asarray(y3[0, 5:]))
    assert not np.allclose(np.asarray(y[0, :5]), np.asarray(y3[0, :5]))


def test_gradients_finite_with_padding(setup):
    cfg, attn, _ = setup
    pos, seg = _packed([[4], [12]])
    x = jax.random.normal(jax.random.key(4), (B, T, cfg.d_model))
    loss = lambda m: jnp.sum(m(x, rope_tables(cfg, jnp.asarray(pos)), jnp.asarray(seg))[0] ** 2)  # noqa: E731
    grads = nnx.grad(loss)(attn)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(nnx.to_pure_dict(grads)))


# ---------------------------------------------------------------- RoPE


def test_rope_depends_only_on_relative_position():
    cfg = KINDS["mha"]
    q, k = jax.random.normal(jax.random.key(5), (2, 1, 1, 1, cfg.attention.head_dim))

    def dot(m, n):
        pos = jnp.asarray([[m, n]])
        cos, sin = rope_tables(cfg, pos)
        qr = apply_rope(q.reshape(1, 1, 1, -1), cos[:, :1], sin[:, :1])
        kr = apply_rope(k.reshape(1, 1, 1, -1), cos[:, 1:], sin[:, 1:])
        return float(jnp.sum(qr * kr))

    assert dot(3, 1) == pytest.approx(dot(10, 8), rel=1e-5)
    assert dot(7, 7) == pytest.approx(float(jnp.sum(q * k)), rel=1e-5)


@pytest.mark.parametrize("mscale_all_dim", [1.0, 0.5])
def test_yarn_frequencies_match_transformers(mscale_all_dim):
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": mscale_all_dim}
    hf = DeepseekV3Config(qk_rope_head_dim=64, rope_scaling=rope, max_position_embeddings=163840)
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours_inv, ours_amp = inv_frequencies(64, 10000.0, YarnConfig(factor=40.0, original_max_position=4096,
                                                                 mscale_all_dim=mscale_all_dim))
    np.testing.assert_allclose(ours_inv, inv.numpy(), rtol=1e-6)
    assert ours_amp == pytest.approx(factor, rel=1e-6)
    plain, amp = inv_frequencies(64, 10000.0, None)
    np.testing.assert_allclose(plain, 10000.0 ** (-np.arange(0, 64, 2) / 64))
    assert amp == 1.0
