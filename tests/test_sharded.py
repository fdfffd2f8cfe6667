"""MuonClip on sharded parameters (8 fake CPU devices, in a fresh process)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import dataclasses
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from k2jax.config import MeshConfig, OptimConfig
    from k2jax.model.presets import PRESETS
    from k2jax.model.transformer import Transformer
    from k2jax.optim import make_optimizer
    from k2jax.parallel.sharding import make_mesh, opt_state_shardings, param_shardings
    from k2jax.params import param_info

    assert jax.device_count() == 8
    cfg = dataclasses.replace(PRESETS["tiny"], compute_dtype="float32")
    model = Transformer(cfg, nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    params, infos = nnx.to_pure_dict(state), param_info(state)
    tx = make_optimizer(OptimConfig(name="muonclip", qk_clip_tau=0.05, warmup_steps=0), infos, 10)
    grads = jax.tree.map(lambda p: jnp.cos(p * 7.0), params)
    stats = {"dense_layers": jnp.asarray([[0.01, 0.2, 0.03, 0.5]]), "moe_layers": jnp.asarray([[0.3, 0.02, 0.04, 0.1]])}

    def step(p, s):
        u, s = tx.update(grads, s, p, attn_max_logits=stats)
        return optax.apply_updates(p, u), s

    ref_p, _ = jax.jit(step)(params, tx.init(params))  # one device

    mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
    shardings = param_shardings(infos, params, mesh)
    sharded = jax.device_put(params, shardings)
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, shardings, mesh))(sharded)
    # optimizer state (Muon momentum, AdamW moments) is laid out like the parameters
    leaves = {x.shape: x.sharding for x in jax.tree.leaves(sharded)}
    mu = [x for x in jax.tree.leaves(opt_state) if x.shape in leaves and x.ndim >= 2]
    assert mu and all(x.sharding.is_equivalent_to(leaves[x.shape], x.ndim) for x in mu)
    new_p, _ = jax.jit(step, out_shardings=(shardings, None))(sharded, opt_state)
    split = [x for x in jax.tree.leaves(new_p) if not x.sharding.is_fully_replicated]
    assert len(split) > 10, len(split)  # experts, heads and embeddings really are split
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5),
                 new_p, ref_p)
    print("SHARDED-OK")
""")


def test_muonclip_on_sharded_params_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert "SHARDED-OK" in out.stdout, out.stdout + out.stderr
