"""The Pallas flash kernel against the plain path: outputs, per-head max logits and gradients.

On CPU the kernel runs in Pallas interpret mode, the same program the GPU compiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2jax.config import AttentionConfig, ExecutionConfig, ModelConfig, MoEConfig
from k2jax.model.attention import attend, attention_mask
from k2jax.kernels.flash_attention import flash_attend
from k2jax.model.transformer import Transformer
from packing import packed_layout

T = 64
# row 0: three documents then padding; row 1: one document filling the row
_, SEG = packed_layout([[20, 9, 23], [T]], T)


def _qkv(h, g, dqk, dv, dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = 2.0 * jax.random.normal(kq, (2, T, h, dqk), jnp.float32)
    k = 2.0 * jax.random.normal(kk, (2, T, g, dqk), jnp.float32)
    v = jax.random.normal(kv, (2, T, g, dv), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


CASES = {  # heads, kv groups, qk dim, v dim (MLA-like 24/16 is padded to 32/16 inside); query, key blocks
    "mha": ((4, 4, 16, 16), (16, 32)),
    "gqa": ((4, 2, 16, 16), (32, 16)),
    "mla_dims": ((2, 2, 24, 16), (16, 32)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flash_matches_plain_outputs_max_logits_and_gradients(case):
    shapes, blocks = CASES[case]
    q, k, v = _qkv(*shapes, jnp.float32)
    seg = jnp.asarray(SEG)
    scale = 0.25
    weights = jax.random.normal(jax.random.key(9), q.shape[:3] + (v.shape[-1],))

    def plain(q, k, v):
        return attend(q, k, v, attention_mask(seg), scale)

    def flash(q, k, v):
        return flash_attend(q, k, v, seg, scale, block_q=blocks[0], block_k=blocks[1])

    (o_ref, m_ref), (o, m) = plain(q, k, v), jax.jit(flash)(q, k, v)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(m), np.asarray(m_ref), rtol=1e-6)
    assert np.all(np.asarray(o)[0, 52:] == 0)  # padding rows attend nowhere

    def loss(fn):
        return lambda *qkv: jnp.sum(fn(*qkv)[0] * weights)

    g_ref = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    g = jax.jit(jax.grad(loss(flash), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g, g_ref):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_flash_bfloat16_close_to_plain():
    q, k, v = _qkv(4, 2, 16, 16, jnp.bfloat16)
    seg = jnp.asarray(SEG)
    o_ref, m_ref = attend(q, k, v, attention_mask(seg), 0.25)
    o, m = jax.jit(lambda q, k, v: flash_attend(q, k, v, seg, 0.25, block_q=16, block_k=16))(q, k, v)
    assert o.dtype == jnp.bfloat16
    # logits accumulate in float32 from the same bfloat16 inputs: the statistic agrees to rounding
    np.testing.assert_allclose(np.asarray(m), np.asarray(m_ref), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref, np.float32), atol=2e-2)


def test_flash_tiles_any_length_when_interpreted_and_refuses_small_tiles_on_gpu():
    q, k, v = _qkv(2, 2, 16, 16, jnp.float32)
    seg = jnp.ones((2, 40), jnp.int32)  # 40 = 8 x 5: tiles of 8
    q, k, v = q[:, :40], k[:, :40], v[:, :40]
    o_ref, m_ref = attend(q, k, v, attention_mask(seg), 0.25)
    o, m = flash_attend(q, k, v, seg, 0.25, interpret=True)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(m), np.asarray(m_ref), rtol=1e-6)
    with pytest.raises(ValueError, match="multiple of 16"):
        flash_attend(q, k, v, seg, 0.25, interpret=False)


def test_model_trains_the_same_with_either_attention():
    """Loss, max-logit statistics and every parameter gradient agree between the two paths (MLA)."""
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_dense_layers=1, dense_ffn_dim=64,
                      max_seq_len=T, compute_dtype="float32",
                      attention=AttentionConfig(kind="mla", num_heads=4, num_kv_heads=2, head_dim=8, kv_lora_rank=16,
                                                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
                      moe=MoEConfig(num_experts=4, expert_ffn_dim=16))
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, 64)
    pos, seg = (jnp.asarray(a) for a in packed_layout([[30, 34], [50]], T))

    def loss_and_grads(impl):
        model = Transformer(cfg, nnx.Rngs(0), ExecutionConfig(attention_impl=impl))

        def loss(m):
            logits, stats = m(tokens, positions=pos, segment_ids=seg)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]), stats

        (value, stats), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        return value, stats.max_logits, nnx.to_pure_dict(grads)

    plain, flash = loss_and_grads("plain"), loss_and_grads("flash")
    np.testing.assert_allclose(float(flash[0]), float(plain[0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(flash[1:]), jax.tree.leaves(plain[1:])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_tpu_flash_matches_plain_in_tpu_interpret_mode():
    """The library's Mosaic kernel with our residual plumbing, run in TPU interpret mode (TPU memory
    simulated on CPU): outputs, max logits and gradients of GQA with MLA-like head dims (24/16,
    padded to one width), packed documents and padding, at T = 256 (two 128-position tiles)."""
    import jax.experimental.pallas.tpu as pltpu

    from k2jax.kernels.flash_attention_tpu import flash_attend_tpu

    t = 256
    _, seg = packed_layout([[100, 100], [t]], t)  # row 0 ends in 56 padding positions
    seg = jnp.asarray(seg)
    kq, kk, kv, kw = jax.random.split(jax.random.key(3), 4)
    q = 2.0 * jax.random.normal(kq, (2, t, 4, 24))
    k = 2.0 * jax.random.normal(kk, (2, t, 2, 24))
    v = jax.random.normal(kv, (2, t, 2, 16))
    weights = jax.random.normal(kw, (2, t, 4, 16))

    def plain(q, k, v):
        return attend(q, k, v, attention_mask(seg), 0.3)

    def tpu(q, k, v):
        return flash_attend_tpu(q, k, v, seg, 0.3)

    def loss(fn):
        return lambda *qkv: jnp.sum(fn(*qkv)[0] * weights)

    with pltpu.force_tpu_interpret_mode():
        o, m = jax.jit(tpu)(q, k, v)
        g = jax.jit(jax.grad(loss(tpu), argnums=(0, 1, 2)))(q, k, v)
    o_ref, m_ref = plain(q, k, v)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(m), np.asarray(m_ref), rtol=1e-6)
    assert np.all(np.asarray(o)[0, 200:] == 0)  # padding rows attend nowhere
    g_ref = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g, g_ref):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4, err_msg=f"d{name}")
    with pytest.raises(ValueError, match="multiple of 128"):
        flash_attend_tpu(q[:, :200], k[:, :200], v[:, :200], seg[:, :200], 0.3)
