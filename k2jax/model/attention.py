"""Causal self-attention (MHA, GQA, MLA) that also reports each head's max logit.

The statistic QK-Clip needs, S_h = max over the batch and all unmasked
(query, key) pairs of the scaled pre-softmax logit, is read off the logits the
plain path materialises anyway, or off the running row maximum of the flash
kernels (k2jax/kernels: `flash_attention.py` on GPU, `flash_attention_tpu.py` on TPU), so it
costs one reduction, not a second pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config import ExecutionConfig, ModelConfig
from k2jax.kernels.select import attention_kernel
from k2jax.kernels.sharded_attention import attend_per_shard
from k2jax.model.layers import ParamInit, RMSNorm, dtype_of, make_param
from k2jax.model.rope import apply_rope, softmax_scale

NEG_INF = -1e30  # finite, so fully masked (padding) rows never produce NaN


def attention_mask(segment_ids):
    """(B, T) segment ids -> (B, T, S) bool: causal, same document, not padding."""
    causal = jnp.tril(jnp.ones((segment_ids.shape[1],) * 2, bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same_doc & (segment_ids[:, :, None] > 0)


def attend(q, k, v, mask, scale):
    """Plain masked softmax attention with per-head max logits.

    q (B, T, H, Dqk), k (B, S, G, Dqk), v (B, S, G, Dv) with H = G * R (GQA groups);
    mask (B, T, S). Returns out (B, T, H, Dv) in q's dtype and max_logits (H,) float32.
    """
    b, t, h, _ = q.shape
    g = k.shape[2]
    qg = q.reshape(b, t, g, h // g, q.shape[-1])
    logits = jnp.einsum("btgrd,bsgd->bgrts", qg, k, preferred_element_type=jnp.float32) * scale
    m = mask[:, None, None]  # (B, 1, 1, T, S)
    max_logits = jnp.max(jnp.where(m, logits, NEG_INF), axis=(0, 3, 4)).reshape(h)
    probs = jax.nn.softmax(jnp.where(m, logits, NEG_INF), axis=-1)
    probs = jnp.where(jnp.any(m, axis=-1, keepdims=True), probs, 0.0)  # padding rows attend nowhere
    out = jnp.einsum("bgrts,bsgd->btgrd", probs.astype(v.dtype), v)
    return out.reshape(b, t, h, v.shape[-1]), jax.lax.stop_gradient(max_logits)


class Attention(nnx.Module):
    """x (B, T, D), rope (cos, sin), segment_ids (B, T) -> y (B, T, D), max_logits (H,)."""

    def __init__(self, cfg: ModelConfig, *, stats_key: str, rngs: nnx.Rngs,
                 execution: ExecutionConfig = ExecutionConfig()):
        self.cfg = cfg
        self.impl = execution.attention_impl
        self.scale = softmax_scale(cfg)
        init = ParamInit.of(cfg)
        att = cfg.attention
        d, h = cfg.d_model, att.num_heads
        qk = dict(in_axes=("embed",), stats_key=stats_key)
        if att.kind == "mla":
            nope, rope, dv = att.qk_nope_head_dim, att.qk_rope_head_dim, att.v_head_dim
            q_roles = (("q_nope", nope), ("q_rope", rope))
            if att.q_lora_rank > 0:
                self.wq_a = make_param(rngs, (d, att.q_lora_rank), init, axes=("embed", "q_lora"), in_axes=("embed",))
                self.q_norm = RMSNorm(att.q_lora_rank, cfg.rms_eps, init, rngs)
                self.wq_b = make_param(rngs, (att.q_lora_rank, h, nope + rope), init,
                                       axes=("q_lora", "heads", "head_dim"), in_axes=("q_lora",), qk=q_roles,
                                       stats_key=stats_key)
            else:
                self.wq = make_param(rngs, (d, h, nope + rope), init, axes=("embed", "heads", "head_dim"),
                                     qk=q_roles, **qk)
            self.wkv_a = make_param(rngs, (d, att.kv_lora_rank + rope), init, axes=("embed", "kv_lora"),
                                    in_axes=("embed",))
            self.kv_norm = RMSNorm(att.kv_lora_rank, cfg.rms_eps, init, rngs)
            self.wkv_b = make_param(rngs, (att.kv_lora_rank, h, nope + dv), init,
                                    axes=("kv_lora", "heads", "head_dim"), in_axes=("kv_lora",),
                                    qk=(("k_nope", nope), ("v", dv)), stats_key=stats_key)
        else:
            dh, g = att.head_dim, att.num_kv_heads
            self.wq = make_param(rngs, (d, h, dh), init, axes=("embed", "heads", "head_dim"), qk=(("q", dh),), **qk)
            self.wk = make_param(rngs, (d, g, dh), init, axes=("embed", "kv_heads", "head_dim"), qk=(("k", dh),),
                                 **qk)
            self.wv = make_param(rngs, (d, g, dh), init, axes=("embed", "kv_heads", "head_dim"), in_axes=("embed",))
            dv = dh
        self.wo = make_param(rngs, (h, dv, d), init, axes=("heads", "head_dim", "embed"),
                             in_axes=("heads", "head_dim"))

    def _w(self, name):
        return getattr(self, name)[...].astype(dtype_of(self.cfg.compute_dtype))

    def _mla_query(self, x, cos, sin):
        """x (B, T, D) -> q (B, T, H, nope + rope), its rotary part rotated."""
        att = self.cfg.attention
        nope = att.qk_nope_head_dim
        if att.q_lora_rank > 0:
            q = jnp.einsum("btc,chd->bthd", self.q_norm(x @ self._w("wq_a")), self._w("wq_b"))
        else:
            q = jnp.einsum("btd,dhk->bthk", x, self._w("wq"))
        return jnp.concatenate([q[..., :nope], apply_rope(q[..., nope:], cos, sin)], axis=-1)

    def _mla_latent(self, x, cos, sin):
        """x (B, T, D) -> what MLA caches per token: the normed latent (B, T, C) and the one rotary key
        shared by all heads (B, T, R), rotated."""
        att = self.cfg.attention
        kv_a = x @ self._w("wkv_a")  # (B, T, C + R)
        latent, k_rope = kv_a[..., :att.kv_lora_rank], kv_a[..., att.kv_lora_rank:]
        return self.kv_norm(latent), apply_rope(k_rope[:, :, None, :], cos, sin)[:, :, 0]

    def _mla_keys_values(self, latent, k_rope):
        """The cached latent (B, S, C) and rotary key (B, S, R) -> per-head k (B, S, H, nope + R), v (B, S, H, Dv)."""
        nope = self.cfg.attention.qk_nope_head_dim
        kv = jnp.einsum("bsc,chd->bshd", latent, self._w("wkv_b"))
        k_nope, v = kv[..., :nope], kv[..., nope:]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:3] + k_rope.shape[-1:])],
                            axis=-1)
        return k, v

    def _project(self, x, cos, sin):
        """x (B, T, D) -> q, k, v for these tokens and their cache entries (`cache_layout`'s fields)."""
        if self.cfg.attention.kind == "mla":
            latent, k_rope = self._mla_latent(x, cos, sin)
            k, v = self._mla_keys_values(latent, k_rope)
            return self._mla_query(x, cos, sin), k, v, {"latent": latent, "k_rope": k_rope}
        q = apply_rope(jnp.einsum("btd,dhk->bthk", x, self._w("wq")), cos, sin)
        k = apply_rope(jnp.einsum("btd,dgk->btgk", x, self._w("wk")), cos, sin)
        v = jnp.einsum("btd,dgk->btgk", x, self._w("wv"))
        return q, k, v, {"k": k, "v": v}

    def __call__(self, x, rope, segment_ids):
        y, max_logits, _ = self.prefill(x, rope, segment_ids)
        return y, max_logits

    def prefill(self, x, rope, segment_ids):
        """The training forward, plus these tokens' cache entries: y (B, T, D), max_logits (H,), entries."""
        q, k, v, entries = self._project(x, *rope)
        fused = attention_kernel(self.impl, x.shape[1])
        if fused is not None:
            out, max_logits = attend_per_shard(fused, q, k, v, segment_ids, self.scale)
        else:
            out, max_logits = attend(q, k, v, attention_mask(segment_ids), self.scale)
        return jnp.einsum("bthd,hde->bte", out, self._w("wo")), max_logits, entries

    def decode(self, x, rope, positions, cache):
        """New tokens against the cache: x (B, T, D) at positions (B, T) -> y (B, T, D), the cache with
        their entries written at those positions. A query attends to every cached position up to its own
        (earlier slots of a row hold its prompt and its earlier tokens; later ones are masked).

        MLA decodes with absorbed up-projections: the query's no-rope part is mapped into the latent
        space (q W_UK), attention runs over the cached latents and rotary keys directly, and W_UV is
        applied to the attended latent, so per-head keys and values are never materialised.
        """
        cos, sin = rope
        rows = jnp.arange(x.shape[0])[:, None]
        if self.cfg.attention.kind == "mla":
            latent, k_rope = self._mla_latent(x, cos, sin)
            cache = {"latent": cache["latent"].at[rows, positions].set(latent.astype(cache["latent"].dtype)),
                     "k_rope": cache["k_rope"].at[rows, positions].set(k_rope.astype(cache["k_rope"].dtype))}
            out = self._absorbed_attend(self._mla_query(x, cos, sin), cache, positions)
        else:
            q, k, v, _ = self._project(x, cos, sin)
            cache = {"k": cache["k"].at[rows, positions].set(k.astype(cache["k"].dtype)),
                     "v": cache["v"].at[rows, positions].set(v.astype(cache["v"].dtype))}
            out, _ = attend(q, cache["k"], cache["v"], _cache_mask(positions, cache["k"].shape[1]), self.scale)
        return jnp.einsum("bthd,hde->bte", out, self._w("wo")), cache

    def _absorbed_attend(self, q, cache, positions):
        """q (B, T, H, nope + R) over cached latents (B, S, C) and rotary keys (B, S, R) -> (B, T, H, Dv)."""
        nope = self.cfg.attention.qk_nope_head_dim
        w_uk, w_uv = self._w("wkv_b")[..., :nope], self._w("wkv_b")[..., nope:]  # (C, H, nope), (C, H, Dv)
        latent, k_rope = cache["latent"].astype(q.dtype), cache["k_rope"].astype(q.dtype)
        q_latent = jnp.einsum("bthn,chn->bthc", q[..., :nope], w_uk)
        logits = (jnp.einsum("bthc,bsc->bhts", q_latent, latent, preferred_element_type=jnp.float32)
                  + jnp.einsum("bthr,bsr->bhts", q[..., nope:], k_rope, preferred_element_type=jnp.float32))
        mask = _cache_mask(positions, latent.shape[1])[:, None]  # (B, 1, T, S)
        probs = jax.nn.softmax(jnp.where(mask, logits * self.scale, NEG_INF), axis=-1)
        attended = jnp.einsum("bhts,bsc->bthc", probs.astype(latent.dtype), latent)
        return jnp.einsum("bthc,chv->bthv", attended, w_uv)


def _cache_mask(positions, capacity: int):
    """positions (B, T) -> (B, T, S) bool: a query sees every cache slot up to its own position."""
    return jnp.arange(capacity)[None, None, :] <= positions[:, :, None]


def cache_layout(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-token cache entry shapes of one attention layer: MLA keeps the normed latent and the shared
    rotary key (kv_lora_rank + qk_rope_head_dim values), MHA/GQA the keys and values of each KV head."""
    att = cfg.attention
    if att.kind == "mla":
        return {"latent": (att.kv_lora_rank,), "k_rope": (att.qk_rope_head_dim,)}
    return {"k": (att.num_kv_heads, att.head_dim), "v": (att.num_kv_heads, att.head_dim)}
