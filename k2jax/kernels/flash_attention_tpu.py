"""Flash attention on TPU that also returns each head's max logit: the library's Mosaic kernel, kept
differentiable.

jax.experimental.pallas.ops.tpu.flash_attention keeps the softmax row sum l and row maximum m
of the scaled, masked logits; asked for them (save_residuals) it refuses to be differentiated.
We call its forward for (o, l, m) and hand the same residuals to its own backward kernels, so
the QK-Clip statistic is a (B, H, T) -> (H,) reduction of numbers the kernel keeps anyway.
These are private functions of the pinned JAX (0.10.2); the tests run them in TPU interpret
mode against the plain path and lower them for TPU.

The library kernel wants (B, H, T, D) with equal q/k/v heads and one head dim for q and v, so
GQA keys and values are repeated per query head (their gradients summed back by AD) and head
dims are zero-padded to a common width (<= 128, or a multiple of 128). Padding queries get
their own segment id so they attend nowhere; their rows come back zero, as on the plain path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

BLOCK = 128  # the kernel's tile (and NUM_LANES): T must be a multiple of it
BLOCKS = tpu_flash.BlockSizes(  # the library's defaults, untuned here (no TPU in our sessions)
    block_q=BLOCK, block_k_major=BLOCK, block_k=BLOCK, block_b=1,
    block_q_major_dkv=BLOCK, block_k_major_dkv=BLOCK, block_k_dkv=BLOCK, block_q_dkv=BLOCK,
    block_k_major_dq=BLOCK, block_k_dq=BLOCK, block_q_dq=BLOCK)


def _forward(q, k, v, segment_ids, scale):
    """(B, H, T, D) q, k, v -> o (B, H, T, D), row sum l and row max m (B, H, T)."""
    return tpu_flash._flash_attention_impl(q, k, v, None, segment_ids, True, True, scale, BLOCKS.block_b,
                                           BLOCKS.block_q, BLOCKS.block_k_major, BLOCKS.block_k, False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids, scale):
    out, _, row_max = _forward(q, k, v, segment_ids, scale)
    return out, row_max


def _flash_fwd(q, k, v, segment_ids, scale):
    out, row_sum, row_max = _forward(q, k, v, segment_ids, scale)
    return (out, row_max), (q, k, v, segment_ids, out, row_sum, row_max)


def _flash_bwd(scale, residuals, cotangents):
    q, k, v, segment_ids, out, row_sum, row_max = residuals
    d_out = cotangents[0]  # the row maximum is a statistic: no gradient flows through it
    dq, dk, dv, _, _ = tpu_flash._flash_attention_bwd(
        False, True, scale, BLOCKS, False, (q, k, v, None, segment_ids, out, row_sum, row_max), d_out)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _head_width(dqk, dv):
    """One head dim for q, k and v that the kernel takes: <= 128, or a multiple of 128."""
    d = max(dqk, dv)
    return d if d <= BLOCK else -(-d // BLOCK) * BLOCK


def flash_attend_tpu(q, k, v, segment_ids, scale):
    """Same contract as `flash_attention.flash_attend`: q (B, T, H, Dqk), k (B, T, G, Dqk),
    v (B, T, G, Dv), segment_ids (B, T) -> out (B, T, H, Dv), max_logits (H,) float32 (no gradient)."""
    b, t, h, dqk = q.shape
    dv = v.shape[-1]
    if t % BLOCK:
        raise ValueError(f"flash attention on TPU needs a sequence length that is a multiple of {BLOCK}, "
                         f"got {t} (use execution.attention_impl: plain or auto)")
    d = _head_width(dqk, dv)

    def heads_first(x):  # (B, T, G, D) -> (B, H, T, d): GQA groups repeated per query head, padded
        x = jnp.repeat(x, h // x.shape[2], axis=2) if x.shape[2] != h else x
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, d - x.shape[-1]))).transpose(0, 2, 1, 3)

    seg = segment_ids.astype(jnp.int32)
    ids = tpu_flash.SegmentIds(q=jnp.where(seg > 0, seg, -1), kv=jnp.where(seg > 0, seg, -2))
    out, row_max = _flash(heads_first(q), heads_first(k), heads_first(v), ids, float(scale))
    out = out.transpose(0, 2, 1, 3)[..., :dv] * (seg > 0)[:, :, None, None].astype(out.dtype)
    # padding rows see only masked logits (about -2.4e38); any real row outweighs them
    max_logits = jnp.max(row_max, axis=(0, 2))  # (B, H, T) -> (H,)
    return out, jax.lax.stop_gradient(max_logits)
