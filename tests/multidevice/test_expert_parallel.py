"""Expert-parallel MoE dispatch on meshes of 8 fake CPU devices: values and gradients equal the
one-device ragged dispatch, with the experts split over the expert axis (all-gather, all-to-all)
and with each shard's tokens run locally; and GSPMD never falls back to replicating and
re-partitioning a tensor (its "Involuntary full rematerialization" warning, which the plain
GSPMD dispatch triggered for expert weights)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from k2jax.config import MeshConfig
from k2jax.kernels.expert_parallel import (ExpertSpecs, Experts, buffer_rows, dispatch_all_gather, dispatch_all_to_all,
                                           dispatch_local, expert_parallel_specs, splits_experts)
from k2jax.kernels.grouped_matmul import dispatch_ragged
from k2jax.parallel.sharding import make_mesh
from k2jax.platform import lowering_for

FULL_REMAT = "Involuntary full rematerialization"
N, D, F, E, K = 64, 16, 8, 8, 3
_keys = jax.random.split(jax.random.key(0), 6)
X = jax.random.normal(_keys[0], (N, D))
IDS = jax.vmap(lambda kk: jax.random.permutation(kk, E)[:K])(jax.random.split(_keys[1], N)).astype(jnp.int32)
IDS = IDS.at[:8].set(jnp.asarray([0, 1, 2]))  # the first shard's tokens crowd the first experts
WEIGHTS = jax.random.uniform(_keys[2], (N, K))
EXPERTS = (jax.random.normal(_keys[3], (E, D, F)), jax.random.normal(_keys[4], (E, D, F)),
           jax.random.normal(_keys[5], (E, F, D)))
PROBE = jax.random.normal(jax.random.key(7), (N, D))
GRAD_ARGS = (0, 1, 2, 3, 4)


def _loss(dispatch, ids=IDS):
    return lambda x, w, *ex: jnp.sum(dispatch(x, ids, w, *ex)[0] * PROBE)


def _on_mesh(dispatch, mesh, specs, **kw):
    """dispatch with `grouped_matmul.dispatch_ragged`'s arguments: x, ids, weights, gate, up, down."""
    return lambda x, ids, w, *ex: dispatch(x, ids, w, Experts(*ex), mesh, specs, **kw)


def _compiled_value_and_grad(dispatch):
    return jax.jit(jax.value_and_grad(_loss(dispatch), argnums=GRAD_ARGS)).lower(X, WEIGHTS, *EXPERTS).compile()


def _check(got, ref, label):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4, err_msg=label)


@pytest.fixture(scope="module")
def reference():
    """Loss and gradients of the one-device ragged dispatch."""
    return jax.value_and_grad(_loss(dispatch_ragged), argnums=GRAD_ARGS)(X, WEIGHTS, *EXPERTS)


@pytest.mark.parametrize("axes", [dict(data=2, fsdp=2, expert=2), dict(data=1, fsdp=2, expert=2, tensor=2),
                                  dict(data=1, expert=8)], ids=str)
def test_split_experts_match_one_device(axes, reference, capfd):
    mesh = make_mesh(MeshConfig(**axes))
    specs = expert_parallel_specs(N, (E, D, F), mesh)
    assert specs is not None and specs.w_in[0] == "expert", (axes, specs)
    for name, dispatch, collective in [("all_gather", dispatch_all_gather, "reduce-scatter"),
                                       ("all_to_all", dispatch_all_to_all, "all-to-all")]:
        step = _compiled_value_and_grad(_on_mesh(dispatch, mesh, specs))
        _check(step(X, WEIGHTS, *EXPERTS), reference, f"{name} {axes}")
        assert collective in step.as_text() and "all-gather" in step.as_text(), (name, axes)
    assert FULL_REMAT not in capfd.readouterr().err


def test_all_to_all_buffer_keeps_the_first_copies_in_token_order(capfd):
    """A receive buffer of 1x the balanced inflow (24 rows) on 8 expert shards, one expert each:
    the crowded experts overflow, and each shard keeps the first 24 copies in token order."""
    mesh = make_mesh(MeshConfig(data=1, expert=8))
    specs = expert_parallel_specs(N, (E, D, F), mesh)
    assert buffer_rows(N // 8, K, 8, 1.0) == 24 and buffer_rows(N // 8, K, 8, 0.0) == 8 * 24
    y, dropped = jax.jit(_on_mesh(dispatch_all_to_all, mesh, specs, buffer_factor=1.0))(X, IDS, WEIGHTS, *EXPERTS)
    flat = np.asarray(IDS).ravel()
    rank = np.array([np.sum(flat[:i] == flat[i]) for i in range(flat.size)])  # earlier copies, same expert
    assert (rank >= 24).any()
    np.testing.assert_allclose(float(dropped), (rank >= 24).mean(), rtol=1e-6)
    kept_ids = jnp.asarray(np.where(rank < 24, flat, -1).reshape(N, K))  # -1: no expert here
    _check(y, dispatch_ragged(X, kept_ids, WEIGHTS, *EXPERTS)[0], "buffer 1x")
    assert FULL_REMAT not in capfd.readouterr().err


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_all_to_all_exchange_is_ragged_all_to_all_on_gpu_and_tpu(platform):
    """Forward and backward: four of XLA's ragged all-to-alls, and no all-reduce (the zero buffers they write
    into are constants: made invariant, their discarded cotangents were all-reduced, one buffer each)."""
    mesh = make_mesh(MeshConfig(data=1, expert=8))
    specs = expert_parallel_specs(N, (E, D, F), mesh)
    with lowering_for(platform):
        grad = jax.grad(_loss(_on_mesh(dispatch_all_to_all, mesh, specs)), argnums=GRAD_ARGS)
        text = jax.jit(grad).trace(X, WEIGHTS, *EXPERTS).lower(lowering_platforms=(platform,)).as_text()
    assert text.count("@ragged_all_to_all") == 4, (platform, text.count("@ragged_all_to_all"))
    assert "all_reduce" not in text, platform


def _all_reduces(text, shapes):
    return [line for line in text.splitlines()
            if re.search(r" all-reduce(-start)?\(", line) and re.search(rf"f32\[({shapes})[,\]]", line)]


@pytest.mark.parametrize("axes", [dict(data=8), dict(data=2, fsdp=4), dict(data=1, fsdp=4, tensor=2)], ids=str)
def test_local_dispatch_matches_one_device_without_token_all_reduces(axes, reference, capfd):
    """No expert axis to split the experts: each shard runs its own tokens through all experts, and
    nothing all-reduces the global token copies (N*K, D) or outputs (N, D), as the GSPMD partition
    of the one-device dispatch does; FSDP weight gradients are reduce-scattered, and only then
    summed over data (never all-reduced at their whole (E, D, F) size)."""
    mesh = make_mesh(MeshConfig(**axes))
    specs = expert_parallel_specs(N, (E, D, F), mesh)
    assert specs is not None and not splits_experts(specs), (axes, specs)
    step = _compiled_value_and_grad(_on_mesh(dispatch_local, mesh, specs))
    _check(step(X, WEIGHTS, *EXPERTS), reference, f"local {axes}")
    text = step.as_text()
    assert not _all_reduces(text, f"{N}|{N * K}"), (axes, _all_reduces(text, f"{N}|{N * K}"))
    assert ("reduce-scatter" in text) == ("fsdp" in axes), axes
    assert "fsdp" not in axes or not _all_reduces(text, f"{E},{D},{F}|{E},{F},{D}"), axes
    assert FULL_REMAT not in capfd.readouterr().err


def test_expert_parallel_specs():
    assert expert_parallel_specs(N, (E, D, F), make_mesh(MeshConfig(data=2, fsdp=4))) == ExpertSpecs(
        tokens=P(("data", "fsdp"), None), w_in=P(None, "fsdp", None), w_out=P(None, None, "fsdp"))
    # experts that do not split over the expert axis stay whole, next to tokens split over it
    specs = expert_parallel_specs(N, (6, D, F), make_mesh(MeshConfig(data=1, expert=8)))
    assert specs.tokens[0] == "expert" and not splits_experts(specs), specs
    # tokens not split (one device, tensor only), or experts split but not the tokens: the caller
    # keeps the one-device path, left to GSPMD
    for axes, rows in [(dict(data=1), N), (dict(data=1, tensor=8), N), (dict(data=2, expert=4), 2)]:
        devices = jax.devices()[:np.prod(list(axes.values()))]
        assert expert_parallel_specs(rows, (E, D, F), make_mesh(MeshConfig(**axes), devices)) is None, axes


def test_the_models_mesh_argument_decides_the_layout_not_the_values():
    """Transformer(...)(tokens, mesh=mesh) under a caller's own jit lays the MoE out with shard_map
    (the step's path); without a mesh it is one GSPMD program. Same logits and statistics either way;
    a mesh that contradicts an ambient one is refused."""
    from flax import nnx

    from k2jax.config import PRESETS, replace
    from k2jax.model.transformer import Transformer
    from k2jax.parallel.sharding import batch_sharding, replicated

    cfg = replace(PRESETS["tiny"], {"compute_dtype": "float32"})
    model = Transformer(cfg, nnx.Rngs(0))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, expert=2))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, replicated(mesh))  # the arrays live on the mesh, as in the train step
    tokens = jax.device_put(jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size),
                            batch_sharding(mesh, (8, 16)))

    def forward(state, tokens, mesh=None):
        return nnx.merge(graphdef, state)(tokens, mesh=mesh)

    with_mesh = jax.jit(lambda s, t: forward(s, t, mesh))
    assert "shard_map" in str(jax.make_jaxpr(with_mesh)(state, tokens))
    assert "shard_map" not in str(jax.make_jaxpr(forward)(state, tokens))
    (a, sa), (b, sb) = with_mesh(state, tokens), jax.jit(forward)(state, tokens)
    _check((a, sa.max_logits, sa.expert_counts), (b, sb.max_logits, sb.expert_counts), "mesh vs none")
    other = make_mesh(MeshConfig(data=8))
    with jax.sharding.use_abstract_mesh(other.abstract_mesh), pytest.raises(ValueError, match="another ambient mesh"):
        jax.make_jaxpr(with_mesh)(state, tokens)


def test_all_to_all_buffer_just_large_enough_equals_dropless_and_one_row_less_drops_the_last_copy():
    """The policy's numpy model: each expert shard receives, in (source shard, expert) order, the copies
    routed to its expert; a buffer of exactly the busiest shard's inflow drops nothing and gives the
    dropless result bit for bit, and one row fewer drops exactly one copy (the busiest shard's last)."""
    mesh = make_mesh(MeshConfig(data=1, expert=8))
    specs = expert_parallel_specs(N, (E, D, F), mesh)
    inflow = np.bincount(np.asarray(IDS).ravel(), minlength=E)  # one expert per shard: copies per shard
    n_local = N // 8
    dropless, _ = jax.jit(_on_mesh(dispatch_all_to_all, mesh, specs, buffer_factor=0.0))(X, IDS, WEIGHTS, *EXPERTS)
    exact = inflow.max() / (n_local * K)
    assert buffer_rows(n_local, K, 8, exact) == inflow.max()
    y, dropped = jax.jit(_on_mesh(dispatch_all_to_all, mesh, specs, buffer_factor=exact))(X, IDS, WEIGHTS, *EXPERTS)
    assert float(dropped) == 0.0
    np.testing.assert_array_equal(np.asarray(y), np.asarray(dropless))
    short = (inflow.max() - 1) / (n_local * K)
    assert buffer_rows(n_local, K, 8, short) == inflow.max() - 1
    y, dropped = jax.jit(_on_mesh(dispatch_all_to_all, mesh, specs, buffer_factor=short))(X, IDS, WEIGHTS, *EXPERTS)
    busiest = [e for e in range(E) if inflow[e] == inflow.max()]
    assert float(dropped) * IDS.size == pytest.approx(len(busiest))
    flat = np.asarray(IDS).ravel()
    kept = flat.copy()
    for e in busiest:  # the policy drops the last copy in token order of each overfull shard
        kept[np.flatnonzero(flat == e)[-1]] = -1
    _check(y, dispatch_ragged(X, jnp.asarray(kept.reshape(N, K)), WEIGHTS, *EXPERTS)[0], "one row short")
