"""Greedy generation by full recomputation: the slow, obviously correct path the cache is checked against.

Every step runs the model over a fixed-size buffer (one compilation; causal attention means the
unwritten tail never reaches the position being read), so n new tokens cost n full forward passes.
Used by the tests and by benchmarks/decode.py as the baseline; `k2jax.inference.engine` is the fast path.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def recompute_greedy(model, prompts, max_new_tokens: int, vocab_size: int | None = None) -> np.ndarray:
    """prompts: token-id lists, any lengths -> (B, max_new_tokens) greedy continuations, drawing only
    ids below vocab_size (the tokenizer's; the model's vocabulary may be padded)."""
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not prompts or min(p.size for p in prompts) == 0 or max_new_tokens < 1:
        raise ValueError("recompute_greedy needs prompts of at least one token and one new token")
    starts = np.array([p.size for p in prompts], np.int32)
    length = int(starts.max()) + max_new_tokens
    if length > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({starts.max()}) + new tokens ({max_new_tokens}) exceed the model's "
                         f"max_seq_len {model.cfg.max_seq_len}")
    buffer = np.zeros((len(prompts), length), np.int32)
    for row, p in zip(buffer, prompts):
        row[:p.size] = p
    graphdef, state = nnx.split(model)
    out = np.asarray(_greedy_loop(graphdef, state, jnp.asarray(buffer), jnp.asarray(starts), int(starts.min()),
                                  vocab_size=vocab_size))
    return np.stack([row[s:s + max_new_tokens] for row, s in zip(out, starts)])


@partial(jax.jit, static_argnames=("graphdef", "first", "vocab_size"))
def _greedy_loop(graphdef, state, buffer, starts, first: int, *, vocab_size: int | None):
    def body(t, carry):  # writes position t from the logits at t - 1, in rows whose prompt ends before t
        buffer, state = carry  # the weights ride in the carry: nnx refuses variables from an outer trace
        logits = nnx.merge(graphdef, state)(buffer)[0][:, t - 1]  # (B, V)
        if vocab_size is not None:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
        token = jnp.where(t >= starts, jnp.argmax(logits, axis=-1).astype(jnp.int32), buffer[:, t])
        return buffer.at[:, t].set(token), state

    return jax.lax.fori_loop(first, buffer.shape[1], body, (buffer, state))[0]
