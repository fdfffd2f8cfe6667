"""k2jax: pretrain Kimi-K2 style Mixture-of-Experts language models in JAX with MuonClip."""

from flax import nnx

# Parameters carry logical axis names as metadata; sharding is applied explicitly by
# k2jax.parallel from one rules table, never eagerly at creation time.
nnx.use_eager_sharding(False)

__version__ = "0.1.0"
