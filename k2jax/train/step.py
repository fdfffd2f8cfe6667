"""Pure, jit-compiled train and eval steps over a plain-pytree train state.

The train state is a dict of arrays (what orbax saves):
  step: int32 scalar; params: nested dict of float32 master weights;
  opt_state: the optax state; model_state: non-trained model variables
  (router balancing biases); rng: uint32 key data.
The model structure (nnx graphdef) is static and rebuilt with nnx.merge inside.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from k2jax.config import Config
from k2jax.model.transformer import Transformer
from k2jax.optim import make_optimizer, qk_clip_metrics
from k2jax.optim.schedules import make_schedule
from k2jax.params import param_info

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions: int32 (B, T)


def init_model(cfg: Config, seed: int):
    """(graphdef, params, model_state) of a freshly initialised model, as pure dicts."""
    model = Transformer(cfg.model, nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest), param_info(params)


def build_optimizer(cfg: Config, infos) -> tuple[optax.GradientTransformationExtraArgs, Callable]:
    return make_optimizer(cfg.optim, infos, cfg.train.steps), make_schedule(cfg.optim, cfg.train.steps)


def init_train_state(cfg: Config):
    """(graphdef, train_state, tx, schedule, param_infos) for a new run."""
    graphdef, params, model_state, infos = init_model(cfg, cfg.train.seed)
    tx, schedule = build_optimizer(cfg, infos)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "model_state": model_state,
        "rng": jax.random.key_data(jax.random.key(cfg.train.seed)),
    }
    return graphdef, state, tx, schedule, infos


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


def _split_micro(batch: Batch, n: int) -> Batch:
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def make_train_step(cfg: Config, graphdef, tx, schedule):
    """train_step(state, batch) -> (state, metrics); gradient accumulation over cfg.train.grad_accum."""
    n_micro = cfg.train.grad_accum
    bias_rate = cfg.model.bias_update_rate

    def micro_loss(params, model_state, micro, n_valid):
        nll_sum, count, stats = _forward(graphdef, params, model_state, micro)
        router_loss = (stats["aux_loss"] + stats["z_loss"]) / n_micro
        return nll_sum / n_valid + router_loss, (nll_sum, stats)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

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

    return train_step


def _merge_stats(a: dict, b: dict) -> dict:
    """Combine micro-batch statistics: max of max-logits, sums of loads and losses."""
    return {
        "max_logits": jax.tree.map(jnp.maximum, a["max_logits"], b["max_logits"]),
        "expert_counts": jax.tree.map(jnp.add, a["expert_counts"], b["expert_counts"]),
        "aux_loss": a["aux_loss"] + b["aux_loss"],
        "z_loss": a["z_loss"] + b["z_loss"],
        "dropped_fraction": jnp.maximum(a["dropped_fraction"], b["dropped_fraction"]),
    }


def make_eval_step(graphdef):
    """eval_step(params, model_state, batch) -> (sum of token NLL, token count)."""

    def eval_step(params, model_state, batch: Batch):
        nll_sum, count, _ = _forward(graphdef, params, model_state, batch)
        return nll_sum, count

    return eval_step

