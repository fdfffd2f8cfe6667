"""Flash attention in Pallas that also returns each head's max logit, at no extra pass.

The online softmax keeps a running row maximum of the scaled logits anyway; the
forward kernel writes it out next to the output and the log-sum-exp, so the
QK-Clip statistic is a (B, H, T) -> (H,) reduction of numbers already computed.
We write the kernel ourselves because the library kernels return only the
log-sum-exp (GPU `mha`) or refuse to be differentiated when asked for the row
maximum (TPU `flash_attention(save_residuals=True)`).

Layout and masking match `attention.attend`: q (B, T, H, Dqk), k (B, S, G, Dqk),
v (B, S, G, Dv) with H = G * R, causal within documents given by segment ids
(0 = padding). Key blocks wholly above the diagonal are skipped. The backward is
FlashAttention-2's: one kernel for dK/dV per key block, one for dQ per query
block, both recomputing probabilities from the saved log-sum-exp.

The kernels are written in the Triton dialect of Pallas (GPU). Elsewhere they run
in interpret mode, which is how the CPU tests check them against the plain path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from k2jax.platform import target_platform

NEG_INF = -1e30
MIN_BLOCK = 16  # smallest tile Triton's matmuls take
WIDE_HEAD = 128  # padded head dims above this (MLA's 192 -> 256) get 64-row tiles, to stay in registers


def _triton_params(dqk, dv):
    """Triton launch settings, named explicitly: without them JAX 0.10 lowers pallas_call through
    Mosaic GPU, which rejects these kernels. Warps as the library's GPU attention picks them."""
    return plt.CompilerParams(num_warps=4 if max(dqk, dv) <= 64 else 8, num_stages=2)


def _block_mask(seg_q, seg_k, q_start, k_start):
    """Causal, same document, not padding: (bq,), (bk,) segment ids -> (bq, bk) bool."""
    q_pos = q_start + jnp.arange(seg_q.shape[0])
    k_pos = k_start + jnp.arange(seg_k.shape[0])
    causal = q_pos[:, None] >= k_pos[None, :]
    return causal & (seg_q[:, None] == seg_k[None, :]) & (seg_q[:, None] > 0)


def _scores(q, k, scale):
    """(bq, D) x (bk, D) -> (bq, bk) float32 scaled logits."""
    return jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale


def _forward_kernel(q_ref, k_ref, v_ref, seg_q_ref, seg_k_ref, o_ref, lse_ref, max_ref, *, scale, block_k):
    block_q = q_ref.shape[0]
    q_start = pl.program_id(0) * block_q
    q, seg_q = q_ref[...], seg_q_ref[...]

    def step(j, carry):
        row_max, row_sum, acc = carry
        keys = pl.ds(j * block_k, block_k)
        mask = _block_mask(seg_q, seg_k_ref[keys], q_start, j * block_k)
        s = jnp.where(mask, _scores(q, k_ref[keys, :], scale), NEG_INF)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - new_max[:, None]), 0.0)
        rescale = jnp.exp(row_max - new_max)
        v = v_ref[keys, :]
        acc = acc * rescale[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return new_max, row_sum * rescale + jnp.sum(p, axis=1), acc

    init = (jnp.full((block_q,), NEG_INF, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32))
    num_blocks = jax.lax.div(q_start + block_q + block_k - 1, block_k)  # causal: later keys never attended
    row_max, row_sum, acc = jax.lax.fori_loop(0, num_blocks, step, init)
    attended = row_sum > 0  # padding rows attend nowhere: output 0
    o_ref[...] = (acc / jnp.where(attended, row_sum, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(attended, row_max + jnp.log(jnp.where(attended, row_sum, 1.0)), 0.0)
    max_ref[...] = row_max


def _dkdv_kernel(q_ref, k_ref, v_ref, seg_q_ref, seg_k_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                 scale, block_q):
    block_k = k_ref.shape[0]
    k_start = pl.program_id(0) * block_k
    k, v, seg_k = k_ref[...], v_ref[...], seg_k_ref[...]

    def step(i, carry):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        mask = _block_mask(seg_q_ref[rows], seg_k, i * block_q, k_start)
        p = jnp.where(mask, jnp.exp(_scores(q, k, scale) - lse_ref[rows][:, None]), 0.0)  # (bq, bk)
        dv = dv + jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[rows][:, None]) * scale
        return dk + jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32), dv

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    first = jax.lax.div(k_start, block_q)  # causal: earlier queries never see this key block
    dk, dv = jax.lax.fori_loop(first, q_ref.shape[0] // block_q, step, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, seg_q_ref, seg_k_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, block_k):
    block_q = q_ref.shape[0]
    q_start = pl.program_id(0) * block_q
    q, do, seg_q = q_ref[...], do_ref[...], seg_q_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def step(j, dq):
        keys = pl.ds(j * block_k, block_k)
        k = k_ref[keys, :]
        mask = _block_mask(seg_q, seg_k_ref[keys], q_start, j * block_k)
        p = jnp.where(mask, jnp.exp(_scores(q, k, scale) - lse[:, None]), 0.0)
        dp = jnp.dot(do, v_ref[keys, :].T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None]) * scale
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    num_blocks = jax.lax.div(q_start + block_q + block_k - 1, block_k)
    dq = jax.lax.fori_loop(0, num_blocks, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _specs(t, h, g, dqk, dv, block):
    """BlockSpecs over the grid (sequence blocks, B, H): per-head tiles, whole sequences for the inner loop."""
    r = h // g
    return dict(
        q_block=pl.BlockSpec((None, block, None, dqk), lambda i, b, hh: (b, i, hh, 0)),
        q_all=pl.BlockSpec((None, t, None, dqk), lambda i, b, hh: (b, 0, hh, 0)),
        o_block=pl.BlockSpec((None, block, None, dv), lambda i, b, hh: (b, i, hh, 0)),
        do_all=pl.BlockSpec((None, t, None, dv), lambda i, b, hh: (b, 0, hh, 0)),
        k_all=pl.BlockSpec((None, t, None, dqk), lambda i, b, hh: (b, 0, hh // r, 0)),
        v_all=pl.BlockSpec((None, t, None, dv), lambda i, b, hh: (b, 0, hh // r, 0)),
        k_block=pl.BlockSpec((None, block, None, dqk), lambda i, b, hh: (b, i, hh // r, 0)),
        v_block=pl.BlockSpec((None, block, None, dv), lambda i, b, hh: (b, i, hh // r, 0)),
        seg_block=pl.BlockSpec((None, block), lambda i, b, hh: (b, i)),
        seg_all=pl.BlockSpec((None, t), lambda i, b, hh: (b, 0)),
        row_block=pl.BlockSpec((None, None, block), lambda i, b, hh: (b, hh, i)),  # (B, H, T) statistics
        row_all=pl.BlockSpec((None, None, t), lambda i, b, hh: (b, hh, 0)),
    )


def _forward(q, k, v, segment_ids, scale, block_q, block_k, interpret):
    b, t, h, dqk = q.shape
    g, dv = k.shape[2], v.shape[-1]
    sp = _specs(t, h, g, dqk, dv, block_q)
    rows = jax.ShapeDtypeStruct((b, h, t), jnp.float32)
    return pl.pallas_call(
        functools.partial(_forward_kernel, scale=scale, block_k=block_k),
        grid=(t // block_q, b, h),
        in_specs=[sp["q_block"], sp["k_all"], sp["v_all"], sp["seg_block"], sp["seg_all"]],
        out_specs=[sp["o_block"], sp["row_block"], sp["row_block"]],
        out_shape=[jax.ShapeDtypeStruct((b, t, h, dv), q.dtype), rows, rows],
        interpret=interpret, compiler_params=_triton_params(dqk, dv),
    )(q, k, v, segment_ids, segment_ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, segment_ids, scale, block_q, block_k, interpret):
    out, _, row_max = _forward(q, k, v, segment_ids, scale, block_q, block_k, interpret)
    return out, row_max


def _flash_fwd(q, k, v, segment_ids, scale, block_q, block_k, interpret):
    out, lse, row_max = _forward(q, k, v, segment_ids, scale, block_q, block_k, interpret)
    return (out, row_max), (q, k, v, segment_ids, out, lse)


def _flash_bwd(scale, block_q, block_k, interpret, residuals, cotangents):
    q, k, v, segment_ids, out, lse = residuals
    d_out = cotangents[0]  # the row maximum is a statistic: no gradient flows through it
    b, t, h, dqk = q.shape
    g, dv = k.shape[2], v.shape[-1]
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
    operands = (q, k, v, segment_ids, segment_ids, d_out, lse, delta)
    sk = _specs(t, h, g, dqk, dv, block_k)
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkdv_kernel, scale=scale, block_q=block_q),
        grid=(t // block_k, b, h),
        in_specs=[sk["q_all"], sk["k_block"], sk["v_block"], sk["seg_all"], sk["seg_block"], sk["do_all"],
                  sk["row_all"], sk["row_all"]],
        out_specs=[sk["q_block"], sk["o_block"]],  # per query head: (B, T, H, Dqk), (B, T, H, Dv)
        out_shape=[jax.ShapeDtypeStruct((b, t, h, dqk), k.dtype), jax.ShapeDtypeStruct((b, t, h, dv), v.dtype)],
        interpret=interpret, compiler_params=_triton_params(dqk, dv),
    )(*operands)
    sq = _specs(t, h, g, dqk, dv, block_q)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=block_k),
        grid=(t // block_q, b, h),
        in_specs=[sq["q_block"], sq["k_all"], sq["v_all"], sq["seg_block"], sq["seg_all"], sq["o_block"],
                  sq["row_block"], sq["row_block"]],
        out_specs=sq["q_block"],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret, compiler_params=_triton_params(dqk, dv),
    )(*operands)
    # Per-query-head key/value gradients summed over each GQA group: (B, S, H, D) -> (B, S, G, D).
    dk = dk.reshape(b, t, g, h // g, dqk).sum(3, dtype=jnp.float32).astype(k.dtype)
    dv_ = dv_.reshape(b, t, g, h // g, dv).sum(3, dtype=jnp.float32).astype(v.dtype)
    return dq, dk, dv_, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _tile(t, block):
    """The largest power of two <= block that divides t (Triton tiles are powers of two)."""
    block = pl.next_power_of_2(block + 1) // 2
    while t % block:
        block //= 2
    return block


def _pad_last(x, size):
    return x if x.shape[-1] == size else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def flash_attend(q, k, v, segment_ids, scale, *, block_q=None, block_k=None, interpret=None):
    """Causal document attention; same contract as `attention.attend` but takes segment ids, not a mask.

    q (B, T, H, Dqk), k (B, T, G, Dqk), v (B, T, G, Dv), segment_ids (B, T) int.
    Returns out (B, T, H, Dv) in q's dtype and max_logits (H,) float32 (no gradient).
    Head dims are zero-padded to a power of two; blocks (default 128, 64 for padded heads wider
    than 128) shrink to powers of two dividing T (Triton tiles); on GPU they must stay >= 16.
    """
    if interpret is None:
        interpret = target_platform() != "gpu"
    b, t, h, dqk = q.shape
    if k.shape[1] != t:
        raise ValueError(f"flash attention is self-attention: q has {t} positions, k has {k.shape[1]}")
    dv = v.shape[-1]
    d_pad, v_pad = pl.next_power_of_2(dqk), pl.next_power_of_2(dv)
    default_block = 64 if max(d_pad, v_pad) > WIDE_HEAD else 128
    block_q, block_k = _tile(t, block_q or default_block), _tile(t, block_k or default_block)
    if not interpret and min(block_q, block_k) < MIN_BLOCK:
        raise ValueError(f"flash attention on GPU needs a sequence length that is a multiple of {MIN_BLOCK}, "
                         f"got {t} (use execution.attention_impl: plain or auto)")
    out, row_max = _flash(_pad_last(q, d_pad), _pad_last(k, d_pad), _pad_last(v, v_pad),
                          segment_ids.astype(jnp.int32), float(scale), block_q, block_k, bool(interpret))
    max_logits = jnp.max(row_max, axis=(0, 2))  # (B, H, T) -> (H,)
    return out[..., :dv], jax.lax.stop_gradient(max_logits)
