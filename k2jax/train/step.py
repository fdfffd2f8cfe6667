"""Pure, jit-compiled train and eval steps over a plain-pytree train state.

The train state is a dict of arrays (what orbax saves):
  step: int32 scalar; params: nested dict of master weights (float32, or
  bfloat16 under model.param_dtype=bfloat16); opt_state: the optax state;
  model_state: non-trained model variables (router balancing biases);
  rng: uint32 key data.
The model structure (nnx graphdef) is static and rebuilt with nnx.merge inside.
Gradients are summed over micro-batches in float32 whatever the parameters'
dtype, and reach the optimizer in the parameters' dtype, so that its state
keeps the dtype it was created with.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from k2jax.config import Config, ConfigError
from k2jax.model import stats as forward_stats
from k2jax.model.transformer import Transformer
from k2jax.optim import make_optimizer, qk_clip_metrics
from k2jax.optim.schedules import make_schedule
from k2jax.parallel.sharding import (LOGICAL_RULES, batch_sharding, make_mesh, opt_state_shardings,
                                     param_shardings, replicated)
from k2jax.params import param_info

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions: int32 (B, T)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything static about a run's state: model structure, optimizer, layout."""

    graphdef: Any  # nnx graph definition of the Transformer
    tx: optax.GradientTransformationExtraArgs
    schedule: Callable
    infos: dict  # ParamInfo per parameter
    mesh: Mesh
    shardings: dict  # NamedSharding per train-state leaf


def _setup_and_init(cfg: Config, mesh: Mesh | None) -> tuple[TrainSetup, Callable[[], dict], dict]:
    """The run's static setup, the function that builds a new state, and that state's shapes."""
    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    seed = cfg.train.seed

    def init():
        _, params, rest = nnx.split(Transformer(cfg.model, nnx.Rngs(seed), cfg.execution), nnx.Param, ...)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": nnx.to_pure_dict(params),
            "opt_state": tx.init(nnx.to_pure_dict(params)),
            "model_state": nnx.to_pure_dict(rest),
            "rng": jax.random.key_data(jax.random.key(seed)),
        }

    abstract_model = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(seed), cfg.execution))
    graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
    infos = param_info(abstract_params)
    tx = make_optimizer(cfg.optim, infos, cfg.train.steps, mesh)
    abstract = jax.eval_shape(init)
    params_sh = param_shardings(infos, abstract["params"], mesh)
    shardings = {
        "step": replicated(mesh), "rng": replicated(mesh), "params": params_sh,
        "opt_state": opt_state_shardings(tx, abstract["params"], params_sh, mesh),
        "model_state": jax.tree.map(lambda _: replicated(mesh), abstract["model_state"]),
    }
    setup = TrainSetup(graphdef, tx, make_schedule(cfg.optim, cfg.train.steps), infos, mesh, shardings)
    return setup, init, abstract


def init_train_state(cfg: Config, mesh: Mesh | None = None) -> tuple[TrainSetup, dict]:
    """A new run's state, initialised directly in its sharded layout on `mesh` (default: from cfg.mesh)."""
    setup, init, _ = _setup_and_init(cfg, mesh)
    return setup, jax.jit(init, out_shardings=setup.shardings)()


def abstract_train_state(cfg: Config, mesh: Mesh | None = None) -> tuple[TrainSetup, dict]:
    """Like init_train_state, but the state is ShapeDtypeStructs with shardings: nothing is allocated."""
    setup, _, abstract = _setup_and_init(cfg, mesh)
    return setup, abstract_state(setup, abstract)


def abstract_batch(cfg: Config, mesh: Mesh) -> dict:
    """The train step's batch as ShapeDtypeStructs sharded over the mesh's data axes."""
    shape = (cfg.train.batch_size, cfg.data.seq_len)
    return {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, shape))
            for name in ("inputs", "targets", "segment_ids", "positions")}


def abstract_state(setup: TrainSetup, state: dict) -> dict:
    """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, setup.shardings)


def token_losses(logits, targets, mask):
    """Sum of next-token cross-entropy over masked-in positions, and their count."""
    logp = jax.nn.log_softmax(logits, axis=-1)  # (B, T, V) float32
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask), jnp.sum(mask)


def _forward(graphdef, params, model_state, batch: Batch, mesh):
    model = nnx.merge(graphdef, params, model_state)
    logits, stats = model(batch["inputs"], batch["positions"], batch["segment_ids"], mesh=mesh)
    mask = (batch["segment_ids"] > 0).astype(jnp.float32)
    nll_sum, count = token_losses(logits, batch["targets"], mask)
    return nll_sum, count, stats


def valid_tokens(batch: Batch):
    """Tokens that count in the loss (not padding), at least 1: float32 scalar."""
    return jnp.maximum(jnp.sum(batch["segment_ids"] > 0), 1).astype(jnp.float32)


def _split_micro(batch: Batch, n: int) -> Batch:
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def _accumulated_grads(cfg: Config, setup: TrainSetup):
    """grads_fn(params, model_state, batch) -> (grads, summed token NLL, ForwardStats): the forward
    and backward pass over cfg.train.grad_accum micro-batches, gradients summed in float32, the
    micro-batches' statistics merged by their fields' rules."""
    graphdef, n_micro = setup.graphdef, cfg.train.grad_accum

    def micro_loss(params, model_state, micro, n_valid):
        nll_sum, count, stats = _forward(graphdef, params, model_state, micro, setup.mesh)
        router_loss = (stats.aux_loss + stats.z_loss) / n_micro
        return nll_sum / n_valid + router_loss, (nll_sum, stats)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def grads_fn(params, model_state, batch: Batch):
        n_valid = valid_tokens(batch)

        def accumulate(carry, micro):
            grads, nll_total, stats_acc = carry
            (_, (nll_sum, stats)), g = grad_fn(params, model_state, micro, n_valid)
            grads = jax.tree.map(lambda total, g: total + g.astype(jnp.float32), grads, g)
            stats_acc = forward_stats.merge(stats_acc, stats) if stats_acc is not None else stats
            return (grads, nll_total + nll_sum, stats_acc), None

        micros = _split_micro(batch, n_micro)
        first = jax.tree.map(lambda x: x[0], micros)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        carry, _ = accumulate((zeros, 0.0, None), first)
        if n_micro > 1:
            rest = jax.tree.map(lambda x: x[1:], micros)
            carry, _ = jax.lax.scan(accumulate, carry, rest)
        grads, nll_total, stats = carry
        return grads, nll_total, forward_stats.finish(stats, n_micro)

    return grads_fn


def _apply_update(setup: TrainSetup, state: dict, grads, max_logits):
    """The optimizer step: (new params, new optimizer state). The gradients are cast to the
    parameters' dtype first, so that the optimizer state keeps its own."""
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state["params"])
    updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"], attn_max_logits=max_logits)
    return optax.apply_updates(state["params"], updates), opt_state


def _check_batch_split(cfg: Config, mesh: Mesh) -> NamedSharding:
    """The batch's sharding, after checking that every micro-batch splits over the data axes."""
    data_parallel = math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])
    if (cfg.train.batch_size // cfg.train.grad_accum) % data_parallel:
        raise ConfigError(f"train.batch_size: micro-batches of {cfg.train.batch_size // cfg.train.grad_accum} rows "
                          f"do not split over the {data_parallel} data-parallel devices of the mesh "
                          "(data x fsdp x expert)")
    return batch_sharding(mesh, (cfg.train.batch_size, cfg.data.seq_len))


def make_grad_step(cfg: Config, setup: TrainSetup):
    """The train step's first half alone, jitted with its shardings (for `k2jax plan`):
    (params, model_state, batch) -> (grads, summed token NLL, stats)."""
    batch_sh = _check_batch_split(cfg, setup.mesh)
    sh = setup.shardings
    return jax.jit(_accumulated_grads(cfg, setup),
                   in_shardings=(sh["params"], sh["model_state"], batch_sh),
                   out_shardings=(sh["params"], replicated(setup.mesh), replicated(setup.mesh)))


def make_update_step(setup: TrainSetup):
    """The train step's second half alone, jitted with its shardings (for `k2jax plan`):
    (state, grads, max_logits) -> (params, opt_state); the state is donated."""
    sh = setup.shardings
    return jax.jit(functools.partial(_apply_update, setup),
                   in_shardings=(sh, sh["params"], replicated(setup.mesh)),
                   out_shardings=(sh["params"], sh["opt_state"]), donate_argnums=(0,))


def make_train_step(cfg: Config, setup: TrainSetup):
    """Jitted train_step(state, batch) -> (state, metrics), sharded per setup; gradient accumulation
    over cfg.train.grad_accum micro-batches. The state argument is donated."""
    graphdef, schedule = setup.graphdef, setup.schedule
    grads_fn = _accumulated_grads(cfg, setup)

    def train_step(state, batch: Batch):
        n_valid = valid_tokens(batch)
        grads, nll_total, stats = grads_fn(state["params"], state["model_state"], batch)
        new_params, opt_state = _apply_update(setup, state, grads, stats.max_logits)

        model = nnx.merge(graphdef, new_params, state["model_state"])
        model.update_router_biases(stats)
        _, _, new_model_state = nnx.split(model, nnx.Param, ...)

        new_state = {
            "step": state["step"] + 1,
            "params": new_params,
            "opt_state": opt_state,
            "model_state": nnx.to_pure_dict(new_model_state),
            "rng": state["rng"],
        }
        metrics = {
            "loss": nll_total / n_valid,
            "grad_norm": optax.global_norm(grads),
            "params_finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)])),
            "learning_rate": schedule(state["step"]),
            "tokens": n_valid,
            "stats": stats.logged(),  # the batch's ForwardStats, less what is never logged (balance_hist)
            **qk_clip_metrics(opt_state),
        }
        return new_state, metrics

    batch_sh = _check_batch_split(cfg, setup.mesh)
    return jax.jit(train_step, in_shardings=(setup.shardings, batch_sh), out_shardings=(setup.shardings, replicated(setup.mesh)),
                   donate_argnums=(0,))


def make_eval_step(setup: TrainSetup):
    """Jitted eval_step(params, model_state, batch) -> (sum of token NLL, token count)."""

    def eval_step(params, model_state, batch: Batch):
        nll_sum, count, _ = _forward(setup.graphdef, params, model_state, batch, setup.mesh)
        return nll_sum, count

    return jax.jit(eval_step, out_shardings=replicated(setup.mesh))

