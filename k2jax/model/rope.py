"""Rotary position embeddings (rotate-half pairing) with optional YaRN extension.

YaRN follows DeepSeek-V3: inverse frequencies blend interpolated (divided by
`factor`) and original values with a linear ramp between the correction dims of
beta_fast and beta_slow; cos/sin carry mscale(factor, mscale) /
mscale(factor, mscale_all_dim), and MLA's softmax scale gains
mscale(factor, mscale_all_dim)**2.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from k2jax.config import ModelConfig, YarnConfig


def rotary_dim(cfg: ModelConfig) -> int:
    return cfg.attention.qk_rope_head_dim if cfg.attention.kind == "mla" else cfg.attention.head_dim


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(dim: int, theta: float, yarn: YarnConfig | None) -> tuple[np.ndarray, float]:
    """(inverse frequencies (dim/2,), cos/sin amplitude factor)."""
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    inv_freq = 1.0 / theta**exponents
    if yarn is None or yarn.factor <= 1.0:
        return inv_freq, 1.0
    low = max(math.floor(_correction_dim(yarn.beta_fast, dim, theta, yarn.original_max_position)), 0)
    high = min(math.ceil(_correction_dim(yarn.beta_slow, dim, theta, yarn.original_max_position)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep_original = 1.0 - ramp  # high-frequency dims extrapolate, low-frequency dims interpolate
    inv_freq = inv_freq / yarn.factor * (1.0 - keep_original) + inv_freq * keep_original
    amplitude = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    return inv_freq, amplitude


def rope_tables(cfg: ModelConfig, positions):
    """positions (B, T) int -> (cos, sin), each float32 (B, T, R/2)."""
    inv_freq, amplitude = inv_frequencies(rotary_dim(cfg), cfg.attention.rope_theta, cfg.attention.yarn)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles) * amplitude, jnp.sin(angles) * amplitude


def apply_rope(x, cos, sin):
    """x (B, T, H, R) -> rotated x; pairs dim i with dim i + R/2."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def softmax_scale(cfg: ModelConfig) -> float:
    scale = cfg.attention.qk_head_dim**-0.5
    if cfg.attention.kind == "mla" and cfg.attention.yarn is not None and cfg.attention.yarn.factor > 1.0:
        scale *= yarn_mscale(cfg.attention.yarn.factor, cfg.attention.yarn.mscale_all_dim) ** 2
    return scale
