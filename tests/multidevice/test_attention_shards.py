"""A Pallas attention kernel is opaque to GSPMD, so it runs under shard_map on each shard's own rows
and heads: on meshes of 8 fake CPU devices it equals the kernel on whole arrays (values, max logits,
gradients), and lowered for GPU its Triton calls see the local block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from k2jax.config import MeshConfig
from k2jax.kernels.sharded_attention import attend_per_shard
from k2jax.kernels.flash_attention import flash_attend
from k2jax.parallel.sharding import make_mesh
from k2jax.platform import lowering_for

B, T, H, G, HEAD_DIM = 8, 32, 4, 2, 16
_keys = jax.random.split(jax.random.key(0), 4)
Q = jax.random.normal(_keys[0], (B, T, H, HEAD_DIM))
KEY, VALUE = (jax.random.normal(kk, (B, T, G, HEAD_DIM)) for kk in _keys[1:3])
PROBE = jax.random.normal(_keys[3], (B, T, H, HEAD_DIM))
SEG = jnp.asarray(np.repeat([[1] * 20 + [2] * 12], B, 0).astype(np.int32))


def _loss(q, k, v):
    out, max_logits = attend_per_shard(flash_attend, q, k, v, SEG, 0.25)
    return jnp.sum(out * PROBE), max_logits


GRAD = jax.value_and_grad(_loss, argnums=(0, 1, 2), has_aux=True)


@pytest.fixture(scope="module")
def reference():
    """No mesh: the kernel on the whole arrays."""
    return GRAD(Q, KEY, VALUE)


# (mesh, the kernel's local q block): heads split with their GQA groups (batch / 4, heads / 2), or
# kept whole when the 2 GQA groups cannot follow 4 head shards (batch / 2, all heads)
@pytest.mark.parametrize("axes,local", [(dict(data=2, fsdp=2, tensor=2), "tensor<2x32x2x16xf32>"),
                                        (dict(data=1, expert=2, tensor=4), "tensor<4x32x4x16xf32>")], ids=str)
def test_fused_attention_runs_per_shard(axes, local, reference):
    mesh = make_mesh(MeshConfig(**axes))

    def sharded(q, k, v):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return GRAD(q, k, v)

    args = jax.device_put((Q, KEY, VALUE), NamedSharding(mesh, P()))
    for a, r in zip(jax.tree.leaves(jax.jit(sharded)(*args)), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5, err_msg=str(axes))
    with lowering_for("cuda"):  # a fresh jit: the first one's trace chose the interpreted kernel
        text = jax.jit(lambda *a: sharded(*a)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "xla.gpu.triton" in line]
    assert len(calls) == 3 and all(f"({local}" in c for c in calls), (axes, [c[-300:] for c in calls])
