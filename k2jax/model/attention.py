"""Causal self-attention (MHA, GQA, MLA) that also reports each head's max logit.

The statistic QK-Clip needs, S_h = max over the batch and all unmasked
(query, key) pairs of the scaled pre-softmax logit, is read off the logits the
plain path materialises anyway, or off the running row maximum of the flash
kernels (`flash_attention.py` on GPU, `flash_attention_tpu.py` on TPU), so it costs one
reduction, not a second pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config import ExecutionConfig, ModelConfig
from k2jax.model.flash_attention import MIN_BLOCK, flash_attend
from k2jax.model.flash_attention_tpu import BLOCK as TPU_BLOCK
from k2jax.model.flash_attention_tpu import flash_attend_tpu
from k2jax.model.layers import RMSNorm, dtype_of, make_param
from k2jax.model.rope import apply_rope, softmax_scale
from k2jax.parallel.sharding import logical_spec, spec_axes
from k2jax.platform import target_platform

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


def attend_per_shard(kernel, q, k, v, segment_ids, scale):
    """Run a fused attention kernel on each shard's own batch rows and heads.

    A Pallas kernel is opaque to GSPMD, which would gather the whole batch onto every device
    to run it. Attention is independent per (row, head), so under the mesh the layers are
    traced for (`Transformer.__call__`'s mesh) each shard runs the kernel on its rows (batch axes) and
    heads (tensor axis, when the key/value groups split the same way); the per-head max
    logits are then maxed over the batch shards. Same contract as `attend` otherwise.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, segment_ids, scale)
    b, _, h, _ = q.shape
    batch = logical_spec(("batch",), (b,), mesh)[0]
    heads = logical_spec(("heads",), (h,), mesh)[0]
    head_shards = 1
    for axis in spec_axes(heads):
        head_shards *= mesh.shape[axis]
    if k.shape[2] % head_shards:  # GQA groups that do not split like the query heads: keep heads whole
        heads = None
    if batch is None and heads is None:
        return kernel(q, k, v, segment_ids, scale)
    rows = jax.sharding.PartitionSpec(batch, None, heads, None)

    def local(q, k, v, segment_ids):
        out, max_logits = kernel(q, k, v, segment_ids, scale)
        return out, jax.lax.pmax(max_logits, spec_axes(batch)) if batch is not None else max_logits

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, jax.sharding.PartitionSpec(batch, None)),
                         out_specs=(rows, jax.sharding.PartitionSpec(heads)), check_vma=False)(q, k, v, segment_ids)


class Attention(nnx.Module):
    """x (B, T, D), rope (cos, sin), segment_ids (B, T) -> y (B, T, D), max_logits (H,)."""

    def __init__(self, cfg: ModelConfig, *, stats_key: str, rngs: nnx.Rngs,
                 execution: ExecutionConfig = ExecutionConfig()):
        self.cfg = cfg
        self.impl = execution.attention_impl
        self.scale = softmax_scale(cfg)
        att = cfg.attention
        d, h = cfg.d_model, att.num_heads
        qk = dict(in_axes=("embed",), stats_key=stats_key)
        if att.kind == "mla":
            nope, rope, dv = att.qk_nope_head_dim, att.qk_rope_head_dim, att.v_head_dim
            q_roles = (("q_nope", nope), ("q_rope", rope))
            if att.q_lora_rank > 0:
                self.wq_a = make_param(rngs, (d, att.q_lora_rank), cfg, axes=("embed", "q_lora"), in_axes=("embed",))
                self.q_norm = RMSNorm(att.q_lora_rank, cfg, rngs)
                self.wq_b = make_param(rngs, (att.q_lora_rank, h, nope + rope), cfg,
                                       axes=("q_lora", "heads", "head_dim"), in_axes=("q_lora",), qk=q_roles,
                                       stats_key=stats_key)
            else:
                self.wq = make_param(rngs, (d, h, nope + rope), cfg, axes=("embed", "heads", "head_dim"),
                                     qk=q_roles, **qk)
            self.wkv_a = make_param(rngs, (d, att.kv_lora_rank + rope), cfg, axes=("embed", "kv_lora"),
                                    in_axes=("embed",))
            self.kv_norm = RMSNorm(att.kv_lora_rank, cfg, rngs)
            self.wkv_b = make_param(rngs, (att.kv_lora_rank, h, nope + dv), cfg,
                                    axes=("kv_lora", "heads", "head_dim"), in_axes=("kv_lora",),
                                    qk=(("k_nope", nope), ("v", dv)), stats_key=stats_key)
        else:
            dh, g = att.head_dim, att.num_kv_heads
            self.wq = make_param(rngs, (d, h, dh), cfg, axes=("embed", "heads", "head_dim"), qk=(("q", dh),), **qk)
            self.wk = make_param(rngs, (d, g, dh), cfg, axes=("embed", "kv_heads", "head_dim"), qk=(("k", dh),),
                                 **qk)
            self.wv = make_param(rngs, (d, g, dh), cfg, axes=("embed", "kv_heads", "head_dim"), in_axes=("embed",))
            dv = dh
        self.wo = make_param(rngs, (h, dv, d), cfg, axes=("heads", "head_dim", "embed"),
                             in_axes=("heads", "head_dim"))

    def _fused_kernel(self, seq_len):
        """The fused attention for this platform (Triton on GPU, the library's Mosaic kernel on TPU,
        the Triton kernel interpreted elsewhere), or None for the plain path."""
        impl, platform = self.impl, target_platform()
        if impl == "plain":
            return None
        kernel, block = (flash_attend_tpu, TPU_BLOCK) if platform == "tpu" else (flash_attend, MIN_BLOCK)
        if impl == "auto" and (platform not in ("gpu", "tpu") or seq_len % block):
            return None  # e.g. sampling at odd lengths falls back to the plain path
        return kernel

    def _w(self, name):
        return getattr(self, name)[...].astype(dtype_of(self.cfg.compute_dtype))

    def _mla_qkv(self, x, cos, sin):
        att = self.cfg.attention
        nope = att.qk_nope_head_dim
        if att.q_lora_rank > 0:
            q = jnp.einsum("btc,chd->bthd", self.q_norm(x @ self._w("wq_a")), self._w("wq_b"))
        else:
            q = jnp.einsum("btd,dhk->bthk", x, self._w("wq"))
        q = jnp.concatenate([q[..., :nope], apply_rope(q[..., nope:], cos, sin)], axis=-1)
        kv_a = x @ self._w("wkv_a")  # (B, T, kv_lora + rope)
        latent, k_rope = kv_a[..., :att.kv_lora_rank], kv_a[..., att.kv_lora_rank:]
        kv = jnp.einsum("btc,chd->bthd", self.kv_norm(latent), self._w("wkv_b"))
        k_nope, v = kv[..., :nope], kv[..., nope:]
        k_rope = apply_rope(k_rope[:, :, None, :], cos, sin)  # one rotary key shared by all heads
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, k_nope.shape[:3] + k_rope.shape[-1:])], axis=-1)
        return q, k, v

    def __call__(self, x, rope, segment_ids):
        cos, sin = rope
        if self.cfg.attention.kind == "mla":
            q, k, v = self._mla_qkv(x, cos, sin)
        else:
            q = apply_rope(jnp.einsum("btd,dhk->bthk", x, self._w("wq")), cos, sin)
            k = apply_rope(jnp.einsum("btd,dgk->btgk", x, self._w("wk")), cos, sin)
            v = jnp.einsum("btd,dgk->btgk", x, self._w("wv"))
        fused = self._fused_kernel(x.shape[1])
        if fused is not None:
            out, max_logits = attend_per_shard(fused, q, k, v, segment_ids, self.scale)
        else:
            out, max_logits = attend(q, k, v, attention_mask(segment_ids), self.scale)
        return jnp.einsum("bthd,hde->bte", out, self._w("wo")), max_logits
