"""Log-likelihood of token spans under a model, packed into fixed (B, T) rows.

Every evaluation that reads log-probabilities (bits per byte, multiple choice) states its
work as `Span`s: ids [x_0 .. x_n] of which the model reads x_0 .. x_{n-1} and predicts
x_1 .. x_n, the predictions from index `scored_from` on counting. Spans are packed into rows
of T tokens the way training packs documents (segment ids, positions restarting at 0 per
span, attention never crossing spans), rows into batches of B; padding rows and positions
are segment 0. So one jitted program of shape (B, T) scores everything, compiled once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from k2jax.parallel import distributed
from k2jax.parallel.sharding import batch_sharding, replicated


@dataclasses.dataclass(frozen=True)
class Span:
    """ids: int32 (n + 1,), n <= T; the predictions of ids[scored_from + 1:] count."""

    ids: np.ndarray
    scored_from: int = 0


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """A model as scoring takes it: nnx structure, parameters, non-trained state, and the mesh they live on
    (None: one device; then the batch goes in as numpy)."""

    graphdef: Any
    params: Any
    model_state: Any
    mesh: Mesh | None = None

    @classmethod
    def of(cls, model: nnx.Module) -> "ModelParts":
        """From a Transformer (e.g. `load_run(...).model`); the mesh is read off its parameters' sharding."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        sharding = jax.tree.leaves(params)[0].sharding
        return cls(graphdef, params, rest, sharding.mesh if isinstance(sharding, NamedSharding) else None)


@functools.lru_cache(maxsize=8)
def _scorer(graphdef, mesh: Mesh | None):
    """Jitted (params, model_state, batch) -> log p(target) (B, T) float32; jit caches one program per shape."""

    def score(params, model_state, batch):
        model = nnx.merge(graphdef, params, model_state)
        logits, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"], mesh=mesh)  # (B, T, V)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]

    return jax.jit(score, out_shardings=replicated(mesh) if mesh is not None else None)


def pack(spans: list[Span], batch_size: int, seq_len: int) -> tuple[list[dict], np.ndarray]:
    """(batches of int32 (B, T) inputs/targets/segment_ids/positions, int64 (N, 3) [batch, row, offset] of each
    span). Spans fill rows in order; one that does not fit in the current row starts the next."""
    rows, where, fill = [], [], seq_len
    for span in spans:
        n = len(span.ids) - 1
        if not 0 < n <= seq_len:
            raise ValueError(f"a span of {n} predictions does not fit a row of {seq_len} tokens")
        if fill + n > seq_len:
            rows.append([])
            fill = 0
        where.append((len(rows) - 1, fill))
        rows[-1].append(span)
        fill += n
    batches = []
    for first in range(0, len(rows), batch_size):
        batch = {k: np.zeros((batch_size, seq_len), np.int32)
                 for k in ("inputs", "targets", "segment_ids", "positions")}
        for r, row in enumerate(rows[first:first + batch_size]):
            offset = 0
            for segment, span in enumerate(row, 1):
                n = len(span.ids) - 1
                cols = slice(offset, offset + n)
                batch["inputs"][r, cols], batch["targets"][r, cols] = span.ids[:-1], span.ids[1:]
                batch["segment_ids"][r, cols], batch["positions"][r, cols] = segment, np.arange(n)
                offset += n
        batches.append(batch)
    index = np.asarray([(row // batch_size, row % batch_size, offset) for row, offset in where], np.int64)
    return batches, index.reshape(-1, 3)


def span_logprobs(parts: ModelParts, spans: list[Span], batch_size: int, seq_len: int) -> np.ndarray:
    """float64 (N,): each span's summed log-probability (nats) of its scored predictions."""
    batches, index = pack(spans, batch_size, seq_len)
    score = _scorer(parts.graphdef, parts.mesh)
    logp = []
    for batch in batches:  # (B, T) each
        if parts.mesh is not None:
            batch = distributed.from_replicated_host(batch, batch_sharding(parts.mesh, (batch_size, seq_len)))
        logp.append(np.asarray(score(parts.params, parts.model_state, batch), np.float64))
    return np.asarray([logp[b][r, o + s.scored_from:o + len(s.ids) - 1].sum() for s, (b, r, o) in zip(spans, index)])
