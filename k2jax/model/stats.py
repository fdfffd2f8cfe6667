"""The forward pass's statistics: one typed record, each field declared with its merge rules.

A layer fills the fields it makes in a `ForwardStats` of its own (the rest stay None);
`over_layers` turns the layers' records, {stats key: record} keyed like the params'
stats_key (a scanned stack's values on a leading L axis), into the model's record by each
field's `layers` rule:
  "keep"  a dict {stats key: (L, ...) or (...)} of the layers that made it ({} if none);
  "sum"   a float32 scalar, the sum over those layers (0 if none);
  "mean"  a float32 scalar, the mean over those layers (0 if none).
The train step merges micro-batches (gradient accumulation) leaf by leaf by each field's
`micro` rule: "max", "sum", or "mean" (summed by `merge`, divided by their count in
`finish`). Devices need no rule here: each layer's value already covers the whole batch
(GSPMD, or the layer's own collective, e.g. the attention's pmax of max logits).
`log` makes the field's metrics.jsonl entries from its host value (None: not logged).

Adding a statistic: a field here and the layer that fills it; the model, the train step
and the log take it up from the declaration.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

_OVER_LAYERS = {"keep", "sum", "mean"}
_MICRO = {"max": jnp.maximum, "sum": jnp.add, "mean": jnp.add}


def stat(*, micro: str, layers: str, log=None, of: str | None = None):
    """A ForwardStats field: its micro-batch and layer merge rules, its log entries (value -> dict),
    and `of`, the field whose per-layer value it collects (default: its own)."""
    assert micro in _MICRO and layers in _OVER_LAYERS, (micro, layers)
    return struct.field(default=None, metadata={"micro": micro, "layers": layers, "log": log, "of": of})


def _layer_order(key: str):
    name, _, idx = key.partition(".")
    return (0 if name.startswith("dense") else 1, int(idx or 0))


def _per_layer(values: dict) -> list[float]:
    """A per-stack statistic ((L,) or scalar each) as one list in model order."""
    return [float(v) for k in sorted(values, key=_layer_order) for v in np.reshape(values[k], -1)]


def scalar(name: str, value) -> dict:
    """Log entry: the value under the field's name."""
    return {name: value}


def per_layer(name: str, values: dict) -> dict:
    """Log entry: one value per layer, in model order (dense layers, then MoE layers)."""
    return {name: _per_layer(values)}


def _log_max_logits(_, max_logits: dict) -> dict:
    """max_logit (the step's largest), max_logit_per_layer (max over heads, model order), max_logit_per_head."""
    if not max_logits:
        return {}
    per_layer_max = [float(v) for k in sorted(max_logits, key=_layer_order)
                     for v in np.asarray(max_logits[k]).max(axis=-1).reshape(-1)]
    return {"max_logit": max(per_layer_max), "max_logit_per_layer": per_layer_max, "max_logit_per_head": max_logits}


def _log_expert_load(_, counts: dict) -> dict:
    """Expert load statistics of a step; per-layer lists (max/mean, min/mean) in model order."""
    if not counts:
        return {}
    loads = np.concatenate([np.reshape(counts[k], (-1, np.shape(counts[k])[-1]))
                            for k in sorted(counts, key=_layer_order)])  # (MoE layers, E)
    mean = np.maximum(loads.mean(axis=-1), 1e-9)
    high, low = loads.max(axis=-1) / mean, loads.min(axis=-1) / mean
    return {"expert_load_min": float(loads.min()), "expert_load_max": float(loads.max()),
            "expert_balance": float(high.mean()),
            "expert_load_max_per_layer": high.tolist(), "expert_load_min_per_layer": low.tolist()}


@struct.dataclass
class ForwardStats:
    """What a forward pass measured; shapes as the model's record holds them (a layer's own: the (...) part)."""

    # {key: (L, H) or (H,)} float32: each layer's per-head max pre-softmax logit (QK-Clip's S_h)
    max_logits: dict | None = stat(micro="max", layers="keep", log=_log_max_logits)
    # {key: (L, E) or (E,)}: tokens routed per expert (MoE layers)
    expert_counts: dict | None = stat(micro="sum", layers="keep", log=_log_expert_load)
    # {key: (L, E, QB_BINS) or (E, QB_BINS)}: Quantile Balancing's histograms (router_balance=quantile)
    balance_hist: dict | None = stat(micro="sum", layers="keep")
    # (): the router losses, already scaled by their coefficients
    aux_loss: jax.Array | None = stat(micro="mean", layers="sum", log=scalar)
    z_loss: jax.Array | None = stat(micro="mean", layers="sum", log=scalar)
    # (): the share of token copies dropped (capacity dispatch, a bounded expert exchange)
    dropped_fraction: jax.Array | None = stat(micro="max", layers="mean", log=scalar)
    # {key: (L,) or ()}: the same, per MoE layer
    dropped_fraction_per_layer: dict | None = stat(micro="max", layers="keep", log=per_layer, of="dropped_fraction")

    def layer(self, key: str) -> ForwardStats:
        """The "keep" fields' values at one stats key (None where that layer made none)."""
        return ForwardStats(**{n: getattr(self, n).get(key) for n, r in _RULES.items() if r["layers"] == "keep"})

    def logged(self) -> ForwardStats:
        """This record with only the fields that have log entries (what a train step hands the host)."""
        return self.replace(**{name: None for name, rules in _RULES.items() if rules["log"] is None})

    def log(self) -> dict:
        """The metrics.jsonl entries of a record whose values are on the host."""
        entries = {}
        for name, rules in _RULES.items():
            if rules["log"] is not None:
                entries.update(rules["log"](name, getattr(self, name)))
        return entries


_RULES = {f.name: f.metadata for f in dataclasses.fields(ForwardStats)}


def over_layers(per_layer_stats: dict[str, ForwardStats]) -> ForwardStats:
    """The model's record from its layers' records {stats key: ForwardStats}, by each field's layers rule."""
    zero = jnp.zeros((), jnp.float32)
    values = {}
    for name, rules in _RULES.items():
        made = {k: getattr(s, rules["of"] or name) for k, s in per_layer_stats.items()}
        made = {k: v for k, v in made.items() if v is not None}
        if rules["layers"] == "keep":
            values[name] = made
        elif rules["layers"] == "sum":
            values[name] = sum((jnp.sum(v) for v in made.values()), zero)
        else:
            values[name] = jnp.mean(jnp.stack([jnp.mean(v) for v in made.values()])) if made else zero
    return ForwardStats(**values)


def merge(a: ForwardStats, b: ForwardStats) -> ForwardStats:
    """Two micro-batches' records as one, by each field's micro rule ("mean" fields summed: see `finish`)."""
    return ForwardStats(**{name: jax.tree.map(_MICRO[rules["micro"]], getattr(a, name), getattr(b, name))
                           for name, rules in _RULES.items()})


def finish(stats: ForwardStats, n_micro: int) -> ForwardStats:
    """The merged record of n_micro micro-batches: its "mean" fields divided by n_micro."""
    return stats.replace(**{name: jax.tree.map(lambda x: x / n_micro, getattr(stats, name))
                            for name, rules in _RULES.items() if rules["micro"] == "mean"})
