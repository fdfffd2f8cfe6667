"""Where parameters land on a mesh, and in which dtype.

Layouts come from the real train state (`abstract_train_state`) on abstract meshes
(`jax.sharding.AbstractMesh`): a 2,048-device kimi-k2 layout is checked on one CPU with
nothing allocated.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from k2jax.cli import main
from k2jax.config import ConfigError, MeshConfig, load_config
from k2jax.parallel.sharding import abstract_mesh, make_mesh
from k2jax.train.step import abstract_train_state, make_train_step


def _config(preset, *overrides):
    return load_config(None, [f"model.preset={preset}", *overrides])


def _layout(cfg, n_devices=None):
    """The train state's ShapeDtypeStructs (with shardings) on cfg's mesh, made abstract."""
    return abstract_train_state(cfg, abstract_mesh(cfg.mesh, n_devices))[1]


def _specs(tree, name):
    """{path: PartitionSpec} of the leaves whose path ends with the parameter `name`."""
    found = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if keys[-1] == name:
            found[keys] = x.sharding.spec
    return found


@pytest.mark.parametrize("preset, overrides, n_devices, message", [
    ("tiny", ["mesh.tensor=8"], None,
     r"mesh\.tensor=8 does not divide the 'heads' dimension \(4\) of parameter \w+/attn/w\w+ "),
    ("kimi-k2", ["mesh.expert=256"], None,
     r"mesh\.expert=256 does not divide the 'experts' dimension \(384\) of parameter moe_layers/ffn/\w+ "
     r".*mesh\.expert=128"),
    ("kimi-k2", ["mesh.data=1", "mesh.fsdp=-1"], 2048,
     r"mesh\.fsdp=2048 does not divide the 'embed' dimension \(7168\) of parameter \S+ .*mesh\.fsdp=1024 "
     r".*remaining factor 2"),
])
def test_a_mesh_axis_that_does_not_divide_a_parameter_is_a_config_error(preset, overrides, n_devices, message):
    with pytest.raises(ConfigError, match=message):
        _layout(_config(preset, *overrides), n_devices)


def test_mla_latent_projections_and_their_momentum_split_over_fsdp():
    """kimi-k2's wq_b and wkv_b (3 GiB of bfloat16 weights, twice that in float32) split on an
    fsdp-only mesh, by their latent rank; their Muon momentum follows."""
    state = _layout(_config("kimi-k2", "mesh.fsdp=8"))
    for name in ("wq_b", "wkv_b"):
        params = _specs(state["params"], name)
        momentum = _specs(state["opt_state"], name)
        assert len(params) == 2 and len(momentum) >= 2, (params, momentum)  # dense and MoE layers
        assert set(params.values()) | set(momentum.values()) == {P(None, "fsdp", None, None)}, name


def test_uneven_latent_ranks_and_key_value_groups_replicate_by_rule():
    """REPLICATE_IF_UNEVEN: large's kv_lora_rank 216 on fsdp 16 keeps wkv_b whole (its q_lora_rank
    768 still splits); GQA with 2 key/value groups on tensor 4 keeps wk/wv whole over tensor."""
    state = _layout(_config("large", "mesh.fsdp=16"))
    assert set(_specs(state["params"], "wkv_b").values()) == {P(None, None, None, None)}
    assert set(_specs(state["params"], "wq_b").values()) == {P(None, "fsdp", None, None)}

    gqa = _layout(_config("tiny", "model.attention.kind=gqa", "model.attention.num_kv_heads=2", "mesh.tensor=4"))
    assert set(_specs(gqa["params"], "wk").values()) == {P(None, None, None, None)}
    assert set(_specs(gqa["params"], "wq").values()) == {P(None, None, "tensor", None)}


@pytest.mark.parametrize("preset", ["kimi-k2", "deepseek-v3"])
def test_k2_presets_keep_float32_master_weights_and_optimizer_state(preset):
    cfg = _config(preset)
    state = _layout(cfg)
    floats = [x.dtype for x in jax.tree.leaves({"p": state["params"], "o": state["opt_state"]})
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert cfg.model.compute_dtype == "bfloat16"
    assert len(floats) > 40 and set(floats) == {jnp.dtype(jnp.float32)}


def test_bfloat16_parameters_accumulate_gradients_in_float32():
    """With param_dtype=bfloat16 and two micro-batches, the gradient sum the micro-batch scan
    carries is float32 for every parameter; the state keeps its bfloat16 dtypes across the step."""
    cfg = _config("tiny", "model.param_dtype=bfloat16", "train.grad_accum=2", "train.batch_size=4",
                  "data.seq_len=16")
    setup, state = abstract_train_state(cfg, make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    batch = {k: jax.ShapeDtypeStruct((4, 16), jnp.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    traced = make_train_step(cfg, setup).trace(state, batch)

    params = jax.tree.leaves(state["params"])
    assert {x.dtype for x in params} == {jnp.dtype(jnp.bfloat16)}
    carried = []
    for eqn in traced.jaxpr.eqns:
        if eqn.primitive.name == "scan":
            start = eqn.params["num_consts"]
            carry = [v.aval for v in eqn.invars[start:start + eqn.params["num_carry"]]]
            if [a.shape for a in carry[:len(params)]] == [x.shape for x in params]:
                carried.append(carry[:len(params)])
    assert len(carried) == 1, "expected one micro-batch scan carrying a gradient per parameter"
    assert {a.dtype for a in carried[0]} == {jnp.dtype(jnp.float32)}

    new_state, _ = traced.out_info
    dtypes = lambda tree: [x.dtype for x in jax.tree.leaves(tree)]  # noqa: E731
    assert dtypes(new_state) == dtypes(state)


def test_info_prints_each_parameters_placement_and_rejects_uneven_meshes(capsys):
    assert main(["info", "--config", "tiny", "--params", "--set", "mesh.fsdp=2", "--set", "mesh.tensor=2"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert rows["embed/table"][-1] == "(tensor,fsdp)"
    assert rows["moe_layers/attn/wkv_b"][-1] == "(-,fsdp,tensor,-)"

    assert main(["info", "--config", "kimi-k2", "--set", "mesh.data=1", "--set", "mesh.fsdp=-1",
                 "--devices", "2048"]) == 2
    assert "config error: mesh.fsdp=2048 does not divide the 'embed' dimension (7168)" in capsys.readouterr().err
