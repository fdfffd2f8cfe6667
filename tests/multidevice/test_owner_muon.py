"""Owner-sharded Muon (k2jax/optim/owner.py) on meshes of 8 fake CPU devices against one device."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from k2jax.config import PRESETS, MeshConfig, OptimConfig, load_config, replace
from k2jax.model.transformer import Transformer
from k2jax.optim import make_optimizer
from k2jax.optim.muon import newton_schulz_flops
from k2jax.optim.owner import owner_layout, plan_owners
from k2jax.parallel.sharding import make_mesh, opt_state_shardings, param_shardings
from k2jax.params import is_info, param_info
from k2jax.train.step import init_train_state, make_train_step

# the real model's tree: scanned layers, stacked experts, a one-layer stack (fewer matrices than
# devices), MLA with a query latent, and a kv latent (20) that fsdp 8 does not divide
CFG = replace(PRESETS["tiny"], {"compute_dtype": "float32", "attention.q_lora_rank": 32, "attention.kv_lora_rank": 20})
_state = nnx.state(Transformer(CFG, nnx.Rngs(0)), nnx.Param)
PARAMS, INFOS = nnx.to_pure_dict(_state), param_info(_state)
GRADS = jax.tree.map(lambda p: jnp.cos(p * 7.0), PARAMS)
STATS = {"dense_layers": jnp.asarray([[0.01, 0.2, 0.03, 0.5]]), "moe_layers": jnp.asarray([[0.3, 0.02, 0.04, 0.1]])}
MATRIX_ALL_REDUCE = re.compile(r"= f32\[(\d+,){1,}\d+\][^=]* all-reduce\(")


def _two_steps(ns_dtype, mesh=None):
    """Parameters after two MuonClip steps, and the sharded step's HLO (on a mesh)."""
    ocfg = OptimConfig(name="muonclip", qk_clip_tau=0.05, warmup_steps=0, ns_dtype=ns_dtype)
    tx = make_optimizer(ocfg, INFOS, 10, mesh)

    def step(p, s):
        u, s = tx.update(GRADS, s, p, attn_max_logits=STATS)
        return optax.apply_updates(p, u), s

    if mesh is None:
        p, s = jax.jit(step)(PARAMS, tx.init(PARAMS))
        return jax.jit(step)(p, s)[0], ""
    sh = param_shardings(INFOS, PARAMS, mesh)
    p = jax.device_put(PARAMS, sh)
    s = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, PARAMS, sh, mesh))(p)
    compiled = jax.jit(step, out_shardings=(sh, None)).lower(p, s).compile()
    p, s = compiled(*compiled(p, s))
    for x, want in zip(jax.tree.leaves(p), jax.tree.leaves(sh)):  # parameters keep their layout
        assert x.sharding.is_equivalent_to(want, x.ndim)
    return p, compiled.as_text()


def _worst(a_tree, b_tree):
    """max |a - b| / max |b| over the leaves."""
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
               for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)))


@pytest.fixture(scope="module")
def reference():
    """One device: parameters after two steps with float32 and bfloat16 iterations, and the band
    between them."""
    ref = {dt: _two_steps(dt)[0] for dt in ("float32", "bfloat16")}
    return ref, _worst(ref["bfloat16"], ref["float32"])


@pytest.mark.parametrize("axes", [dict(data=1, fsdp=8), dict(data=2, fsdp=2, expert=2), dict(data=1, fsdp=4, tensor=2),
                                  dict(data=1, expert=8)], ids=str)
def test_owner_muon_equals_one_device(axes, reference):
    """float32: within 1e-6 relative (float32 rounding, not bitwise); bfloat16 iterations, on one
    mesh: as far from float32 as the one-device bfloat16 path. Parameters keep their layout, and no
    matrix is all-reduced."""
    ref, band = reference
    mesh = make_mesh(MeshConfig(**axes))
    got, hlo = _two_steps("float32", mesh)
    err = _worst(got, ref["float32"])
    assert err < 1e-6, (axes, err)
    # no per-iteration all-reduce of a matrix: only the scalars of norms and QK-Clip
    assert not MATRIX_ALL_REDUCE.search(hlo), (axes, MATRIX_ALL_REDUCE.search(hlo).group(0))
    assert " conditional(" in hlo, axes  # padding slots (a one-layer stack on 8 devices) are skipped
    if axes == dict(data=2, fsdp=2, expert=2):  # bfloat16 iterations (one mesh: compile time):
        got16, _ = _two_steps("bfloat16", mesh)  # as far from float32 as the one-device bfloat16 path
        off16 = (_worst(got16, ref["float32"]), _worst(got16, ref["bfloat16"]))
        assert off16[0] < 1.25 * band and off16[1] < band, (axes, off16, band)
    print(axes, "float32 max rel err", err)


@pytest.mark.parametrize("axes", [dict(data=1, fsdp=8), dict(data=2, fsdp=2, expert=2), dict(data=1, fsdp=4, tensor=2),
                                  dict(data=1, expert=8)], ids=str)
def test_owner_assignment_counts_every_matrix_once_and_balances(axes):
    """Every matrix is orthogonalised once per copy of it that does not split its work: once,
    unless a replica axis would not lower the matrices per device (then each replica repeats the
    work instead of padding and gathering); stacks that would pad are pooled (once each); padding
    slots are skipped."""
    mesh = make_mesh(MeshConfig(**axes))
    leaves = jax.tree.leaves(PARAMS)
    flat_infos = jax.tree.leaves(INFOS, is_leaf=is_info)
    own, pools, load = plan_owners(INFOS, leaves, mesh, 5)
    expected = 0.0
    for i, layout, _ in own:
        in_spec = set(jax.tree.leaves(tuple(layout.spec)))
        repeats = np.prod([mesh.shape[a] for a in mesh.axis_names if a not in in_spec | set(layout.replicas)])
        matrices = np.prod([leaves[i].shape[d] for d in flat_infos[i].batch_axes])
        expected += 5 * layout.matrix_flops * matrices * repeats
    pooled = [leaf for pool in pools for leaf in pool.leaves]
    expected += sum(5 * leaf.layout.matrix_flops * leaf.layout.matrices for leaf in pooled)
    assert pooled  # the one-layer stacks (fewer matrices than devices) on every mesh here
    assert len(own) + len(pooled) == sum(info.kind == "matrix" for info in flat_infos)
    assert abs(load.sum() - expected) <= 1e-9 * expected, (axes, load.sum(), expected)
    assert load.sum() >= newton_schulz_flops(INFOS, PARAMS) * (1 - 1e-9)
    heaviest = 5 * max([layout.matrix_flops for _, layout, _ in own] + [leaf.layout.matrix_flops for leaf in pooled])
    assert load.max() <= load.mean() + heaviest, (axes, load.max(), load.mean(), heaviest)
    print(axes, "busiest device / mean", load.max() / load.mean())


def test_owner_layouts():
    # experts split only over the expert axis sit whole on their device: no traffic for them
    mesh = make_mesh(MeshConfig(data=1, expert=8))
    experts = INFOS["moe_layers"]["ffn"]["wi_gate"]
    layout = owner_layout(experts, PARAMS["moe_layers"]["ffn"]["wi_gate"].shape, mesh)
    assert layout.group == 1 and not layout.exchanges and not layout.replicas, layout
    # a stack of one matrix on fsdp 8: exchanged over fsdp, padded to 8, one owner
    wq = owner_layout(INFOS["dense_layers"]["attn"]["wq_a"], PARAMS["dense_layers"]["attn"]["wq_a"].shape,
                      make_mesh(MeshConfig(data=1, fsdp=8)))
    assert wq.group == 8 and [a for _, a in wq.exchanges] == ["fsdp"], wq


@pytest.fixture(scope="module")
def one_device_losses(tiny_batch):
    return _train_losses(tiny_batch, make_mesh(MeshConfig(data=1), jax.devices()[:1]))


def _train_losses(batch, mesh):
    """Losses of two train steps on experiments/tiny.yaml (the second sees the first update)."""
    cfg = load_config("experiments/tiny.yaml", ["model.compute_dtype=float32", "train.batch_size=16"])
    setup, state = init_train_state(cfg, mesh)
    step = make_train_step(cfg, setup)
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.parametrize("axes", [dict(data=1, fsdp=8), dict(data=1, expert=8)], ids=str)
def test_owner_muon_train_step_matches_one_device(axes, one_device_losses, tiny_batch):
    """A whole MuonClip train step with owner-sharded Muon (the owner meshes that
    test_sharded_train.py does not cover) gives the one-device losses."""
    np.testing.assert_allclose(_train_losses(tiny_batch, make_mesh(MeshConfig(**axes))), one_device_losses,
                               rtol=2e-4, err_msg=str(axes))
