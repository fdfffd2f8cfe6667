"""MuonClip and the whole train step on meshes of 8 fake CPU devices against one device."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from k2jax.config import PRESETS, ConfigError, MeshConfig, OptimConfig, load_config, replace
from k2jax.model.transformer import Transformer
from k2jax.optim import make_optimizer
from k2jax.parallel.sharding import logical_spec, make_mesh, opt_state_shardings, param_shardings
from k2jax.params import is_info, param_info
from k2jax.train.checkpoint import Checkpointer
from k2jax.train.step import abstract_state, init_train_state, make_train_step

# GSPMD's warning when it has to replicate and re-partition a tensor (it did for expert weights and
# the embedding lookup before the explicit expert-parallel dispatch and embedding gather)
FULL_REMAT = "Involuntary full rematerialization"


def test_muonclip_on_sharded_params_matches_one_device():
    # q_lora_rank: MLA's wq_b as well as wkv_b, both split over fsdp by their latent rank
    cfg = replace(PRESETS["tiny"], {"compute_dtype": "float32", "attention.q_lora_rank": 32})
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
    assert all(sharded[k]["attn"][w].sharding.spec[1] == "fsdp" for k in ("dense_layers", "moe_layers")
               for w in ("wq_b", "wkv_b"))
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, shardings, mesh))(sharded)
    # optimizer state (Muon momentum, AdamW moments) is laid out like the parameters
    leaves = {x.shape: x.sharding for x in jax.tree.leaves(sharded)}
    mu = [x for x in jax.tree.leaves(opt_state) if x.shape in leaves and x.ndim >= 2]
    assert mu and all(x.sharding.is_equivalent_to(leaves[x.shape], x.ndim) for x in mu)
    new_p, _ = jax.jit(step, out_shardings=(shardings, None))(sharded, opt_state)
    split = [x for x in jax.tree.leaves(new_p) if not x.sharding.is_fully_replicated]
    assert len(split) > 10, len(split)  # experts, heads and embeddings really are split
    chex.assert_trees_all_close(new_p, ref_p, rtol=2e-4, atol=2e-5)


CFG = ["model.compute_dtype=float32", "train.grad_accum=2", "train.batch_size=16"]
MESHES = {"one device": dict(data=1), "data=2 fsdp=2 expert=2": dict(data=2, fsdp=2, expert=2),
          "fsdp=2 expert=2 tensor=2": dict(data=1, fsdp=2, expert=2, tensor=2), "data=2 fsdp=4": dict(data=2, fsdp=4),
          "fsdp=2 expert=4, 2x buffer": dict(data=1, fsdp=2, expert=4)}


def _mesh(name):
    axes = MESHES[name]
    return make_mesh(MeshConfig(**axes), jax.devices()[:1]) if name == "one device" else make_mesh(MeshConfig(**axes))


@pytest.fixture(scope="module")
def runs(tiny_batch, stderr_of):
    """Per mesh: (setup, state after two steps, step, losses), and what XLA wrote to stderr meanwhile.
    The tensor-split mesh exchanges token copies by all-to-all, the expert-split ones by all-gather (one by
    all-to-all into a receive buffer of 2x the balanced inflow, which this batch never fills); without an
    expert axis each shard runs its own tokens through all experts."""
    cfg = load_config("experiments/tiny.yaml", CFG)
    a2a = replace(cfg, {"execution.expert_parallel": "all_to_all"})
    bounded = replace(a2a, {"execution.expert_buffer_factor": 2.0})

    def train():
        out = {}
        for name in MESHES:
            run_cfg = bounded if "buffer" in name else a2a if "tensor" in name else cfg
            setup, state = init_train_state(run_cfg, _mesh(name))
            step = make_train_step(run_cfg, setup)
            losses = []
            for _ in range(2):
                state, metrics = step(state, tiny_batch)
                losses.append(float(metrics["loss"]))
                assert float(metrics["stats"].dropped_fraction) == 0.0, name
            out[name] = (setup, state, step, losses)
        return out

    return stderr_of(train)


def _check_layout(name, setup, state, mesh):
    """Every parameter and its Muon momentum / Adam moments sit where the rules say."""
    flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    infos = jax.tree.leaves(setup.infos, is_leaf=is_info)
    for (path, x), info in zip(flat, infos):
        assert x.sharding.spec == logical_spec(info.axes, x.shape, mesh), (name, path, x.sharding.spec)
    specs = {x.shape: x.sharding.spec for _, x in flat}
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim >= 2]
    assert moments and all(x.sharding.spec == specs[x.shape] for x in moments), name


def test_train_step_on_several_meshes_matches_one_device(runs):
    runs, log = runs
    ref = runs["one device"][3]
    for name, (setup, state, _, losses) in runs.items():
        _check_layout(name, setup, state, _mesh(name))
        np.testing.assert_allclose(losses, ref, rtol=2e-4, err_msg=name)
    assert FULL_REMAT not in log, log


def test_train_step_never_all_reduces_a_token_buffer(runs, tiny_batch, capfd):
    """Not a micro-batch's (512 x 2, D) token copies nor its (512, D) rows."""
    _, state, step, _ = runs[0]["data=2 fsdp=4"]
    token_buffers = [line for line in step.lower(state, tiny_batch).compile().as_text().splitlines()
                     if re.search(r" all-reduce(-start)?\(", line) and re.search(r"f32\[(512|1024),", line)]
    assert not token_buffers, token_buffers
    assert FULL_REMAT not in capfd.readouterr().err


def test_batch_that_does_not_split_over_the_mesh_is_refused(runs):
    setup = runs[0]["data=2 fsdp=2 expert=2"][0]
    with pytest.raises(ConfigError, match=re.escape("train.batch_size")):
        make_train_step(load_config("experiments/tiny.yaml", ["train.batch_size=4", "train.grad_accum=2"]), setup)


def test_checkpoint_saved_on_one_mesh_restores_onto_another(runs, tiny_batch, tmp_path, capfd):
    """Same values, the new mesh's layout, the same next loss."""
    _, src_state, src_step, _ = runs[0]["data=2 fsdp=2 expert=2"]
    dst_setup, dst_template, dst_step, _ = runs[0]["fsdp=2 expert=2 tensor=2"]
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(2, src_state, {"processes": [{}]}, {})
    restored, _, _ = ckpt.restore(abstract_state(dst_setup, dst_template))
    ckpt.close()
    chex.assert_trees_all_equal(restored, src_state)
    _check_layout("restored", dst_setup, restored, _mesh("fsdp=2 expert=2 tensor=2"))
    _, after_src = src_step(src_state, tiny_batch)
    _, after_dst = dst_step(restored, tiny_batch)
    np.testing.assert_allclose(float(after_dst["loss"]), float(after_src["loss"]), rtol=2e-4)
    assert FULL_REMAT not in capfd.readouterr().err


def test_a_bounded_expert_exchange_logs_warns_and_plots_each_layers_dropped_copies(tmp_path, capsys):
    import json

    from k2jax.train.loop import train

    out = tmp_path / "run"
    cfg = load_config("experiments/tiny.yaml", [
        "mesh.data=1", "mesh.expert=8", "execution.expert_parallel=all_to_all", "execution.expert_buffer_factor=0.25",
        f"train.out_dir={out}", "train.steps=2", "train.log_every=1", "train.progress=false",
        "checkpoint.async_save=false", "eval.tasks=[]", "eval.bits_per_byte=[]"])
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    moe_layers = cfg.model.num_layers - cfg.model.num_dense_layers
    for r in records:
        per_layer = r["dropped_fraction_per_layer"]
        assert len(per_layer) == moe_layers and all(0.5 < v < 1 for v in per_layer), per_layer  # 1/4 of the inflow fits
        assert np.mean(per_layer) == pytest.approx(r["dropped_fraction"])
    assert "MoE layer 0 dropped" in capsys.readouterr().err
    assert (out / "curves.png").is_file()
