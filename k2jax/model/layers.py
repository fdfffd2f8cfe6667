"""Small building blocks: parameter creation, RMSNorm, embeddings, SwiGLU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from k2jax.config import ModelConfig
from k2jax.parallel.sharding import logical_spec
from k2jax.params import param_metadata


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


@dataclasses.dataclass(frozen=True)
class ParamInit:
    """How a layer creates its parameters: the stored dtype and the std of normal inits."""

    dtype: str = "float32"
    std: float = 0.02

    @classmethod
    def of(cls, cfg: ModelConfig) -> ParamInit:
        return cls(cfg.param_dtype, cfg.init_std)


def make_param(rngs: nnx.Rngs, shape, init: ParamInit, *, axes, kind="matrix", in_axes=(), qk=None,
               stats_key=None, fill="normal", std=None) -> nnx.Param:
    """An nnx.Param carrying k2jax metadata (see k2jax/params.py).

    fill: "normal" (std defaults to init.std), "ones" or "zeros".
    """
    if fill == "normal":
        value = jax.random.normal(rngs.params(), shape, jnp.float32) * (init.std if std is None else std)
    elif fill == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif fill == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        raise ValueError(f"unknown fill {fill!r}")
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    return nnx.Param(value.astype(dtype_of(init.dtype)), **param_metadata(axes, kind, in_axes, qk, stats_key))


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale, computed in float32."""

    def __init__(self, dim: int, eps: float, init: ParamInit, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = make_param(rngs, (dim,), init, axes=("norm",), kind="norm", fill="ones")

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding table (V, D); `attend` gives tied output logits."""

    def __init__(self, vocab_size: int, d_model: int, compute_dtype: str, init: ParamInit, rngs: nnx.Rngs):
        self.cdtype = dtype_of(compute_dtype)
        self.table = make_param(rngs, (vocab_size, d_model), init, axes=("vocab", "embed"), kind="embedding", std=1.0)

    def __call__(self, tokens):  # (B, T) -> (B, T, D)
        table = self.table[...]
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty:  # gather the FSDP (d_model) shards first, as for any FSDP weight; left
            # to itself GSPMD replicates the looked-up (B, T, D) activations instead
            vocab = logical_spec(("vocab",), table.shape[:1], mesh)[0]
            table = jax.lax.with_sharding_constraint(table, PartitionSpec(vocab, None))
        return jnp.take(table, tokens, axis=0).astype(self.cdtype)

    def attend(self, x):  # (B, T, D) -> (B, T, V)
        return jnp.einsum("btd,vd->btv", x, self.table[...].astype(x.dtype))


class SwiGLU(nnx.Module):
    """Dense gated FFN: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, d_model: int, ffn_dim: int, init: ParamInit, rngs: nnx.Rngs):
        d = d_model
        self.gate = make_param(rngs, (d, ffn_dim), init, axes=("embed", "mlp"), in_axes=("embed",))
        self.up = make_param(rngs, (d, ffn_dim), init, axes=("embed", "mlp"), in_axes=("embed",))
        self.down = make_param(rngs, (ffn_dim, d), init, axes=("mlp", "embed"), in_axes=("mlp",))

    def __call__(self, x):  # (..., D) -> (..., D)
        dt = x.dtype
        h = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
        return h @ self.down[...].astype(dt)
