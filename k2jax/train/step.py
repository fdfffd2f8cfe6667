"""Pure, jit-compiled train and eval steps over a plain-pytree train state.

The train state is a dict of arrays (what orbax saves):
  step: int32 scalar; params: nested dict of float32 master weights;
  opt_state: the optax state; model_state: non-trained model variables
  (router balancing biases); rng: uint32 key data.
The model structure (nnx graphdef) is static and rebuilt with nnx.merge inside.
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
from jax.sharding import Mesh

from k2jax.config import Config, ConfigError
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
        _, params, rest = nnx.split(Transformer(cfg.model, nnx.Rngs(seed)), nnx.Param, ...)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": nnx.to_pure_dict(params),
            "opt_state": tx.init(nnx.to_pure_dict(params)),
            "model_state": nnx.to_pure_dict(rest),
            "rng": jax.random.key_data(jax.random.key(seed)),
        }

    graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(seed))),
                                             nnx.Param, ...)
    infos = param_info(abstract_params)
    tx = make_optimizer(cfg.optim, infos, cfg.train.steps)
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


def abstract_state(setup: TrainSetup, state: dict) -> dict:
    """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, setup.shardings)


def token_losses(logits, targets, mask):
    """Sum of next-token cross-entropy over masked-in positions, and their count."""
    logp = jax.nn.log_softmax(logits, axis=-1)  # (B, T, V) float32
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask), jnp.sum(mask)


def _forward(graphdef, params, model_state, batch: Batch):
    model = nnx.merge(graphdef, params, model_state)
    logits, stats = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = (batch["segment_ids"] > 0).astype(jnp.float32)
    nll_sum, count = token_losses(logits, batch["targets"], mask)
    return nll_sum, count, stats


def _with_mesh(mesh):
    """Trace fn with `mesh` as the abstract mesh, so layers can lay out explicit collectives (MoE)."""

    def wrap(fn):
        @functools.wraps(fn)
        def traced(*args):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return fn(*args)

        return traced

    return wrap


def _split_micro(batch: Batch, n: int) -> Batch:
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def make_train_step(cfg: Config, setup: TrainSetup):
    """Jitted train_step(state, batch) -> (state, metrics), sharded per setup; gradient accumulation
    over cfg.train.grad_accum micro-batches. The state argument is donated."""
    graphdef, tx, schedule = setup.graphdef, setup.tx, setup.schedule
    n_micro = cfg.train.grad_accum
    bias_rate = cfg.model.bias_update_rate

    def micro_loss(params, model_state, micro, n_valid):
        nll_sum, count, stats = _forward(graphdef, params, model_state, micro)
        router_loss = (stats["aux_loss"] + stats["z_loss"]) / n_micro
        return nll_sum / n_valid + router_loss, (nll_sum, stats)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    @_with_mesh(setup.mesh)
    def train_step(state, batch: Batch):
        params, model_state = state["params"], state["model_state"]
        n_valid = jnp.maximum(jnp.sum(batch["segment_ids"] > 0), 1).astype(jnp.float32)

        def accumulate(carry, micro):
            grads, nll_total, stats_acc = carry
            (_, (nll_sum, stats)), g = grad_fn(params, model_state, micro, n_valid)
            grads = jax.tree.map(jnp.add, grads, g)
            stats_acc = _merge_stats(stats_acc, stats) if stats_acc is not None else stats
            return (grads, nll_total + nll_sum, stats_acc), None

        micros = _split_micro(batch, n_micro)
        first = jax.tree.map(lambda x: x[0], micros)
        zeros = jax.tree.map(jnp.zeros_like, params)
        carry, _ = accumulate((zeros, 0.0, None), first)
        if n_micro > 1:
            rest = jax.tree.map(lambda x: x[1:], micros)
            carry, _ = jax.lax.scan(accumulate, carry, rest)
        grads, nll_total, stats = carry

        updates, opt_state = tx.update(grads, state["opt_state"], params, attn_max_logits=stats["max_logits"])
        new_params = optax.apply_updates(params, updates)

        model = nnx.merge(graphdef, new_params, model_state)
        model.update_router_biases(stats["expert_counts"], bias_rate)
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
            "aux_loss": stats["aux_loss"] / n_micro,
            "z_loss": stats["z_loss"] / n_micro,
            "grad_norm": optax.global_norm(grads),
            "params_finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)])),
            "learning_rate": schedule(state["step"]),
            "tokens": n_valid,
            "max_logits": stats["max_logits"],
            "expert_counts": stats["expert_counts"],
            "dropped_fraction": stats["dropped_fraction"],
            **qk_clip_metrics(opt_state),
        }
        return new_state, metrics

    data_parallel = math.prod(setup.mesh.shape[a] for a in LOGICAL_RULES["batch"])
    if (cfg.train.batch_size // n_micro) % data_parallel:
        raise ConfigError(f"train.batch_size: micro-batches of {cfg.train.batch_size // n_micro} rows do not split "
                          f"over the {data_parallel} data-parallel devices of the mesh (data x fsdp x expert)")
    batch_sh = batch_sharding(setup.mesh, (cfg.train.batch_size, cfg.data.seq_len))
    return jax.jit(train_step, in_shardings=(setup.shardings, batch_sh), out_shardings=(setup.shardings, replicated(setup.mesh)),
                   donate_argnums=(0,))


def _merge_stats(a: dict, b: dict) -> dict:
    """Combine micro-batch statistics: max of max-logits, sums of loads and losses."""
    return {
        "max_logits": jax.tree.map(jnp.maximum, a["max_logits"], b["max_logits"]),
        "expert_counts": jax.tree.map(jnp.add, a["expert_counts"], b["expert_counts"]),
        "aux_loss": a["aux_loss"] + b["aux_loss"],
        "z_loss": a["z_loss"] + b["z_loss"],
        "dropped_fraction": jnp.maximum(a["dropped_fraction"], b["dropped_fraction"]),
    }


def make_eval_step(setup: TrainSetup):
    """Jitted eval_step(params, model_state, batch) -> (sum of token NLL, token count)."""

    @_with_mesh(setup.mesh)
    def eval_step(params, model_state, batch: Batch):
        nll_sum, count, _ = _forward(setup.graphdef, params, model_state, batch)
        return nll_sum, count

    return jax.jit(eval_step, out_shardings=replicated(setup.mesh))

