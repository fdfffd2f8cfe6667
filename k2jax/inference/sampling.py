"""Choosing the next token: greedy, temperature, top-k, top-p, with per-row settings and keys.

Pure functions of (logits, settings), so they can be tested alone. Each row draws with
key(seed) folded with the number of tokens its request has generated, so a seeded request
produces the same text alone or batched with others.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

TOP_LOGPROBS = 5  # alternatives reported per token (OpenAI's completions API allows up to 5)


class RowSettings(NamedTuple):
    """Per-row sampling settings, each (B,)."""
    temperature: jax.Array  # float32; 0 is greedy
    top_k: jax.Array  # int32; 0 keeps every token
    top_p: jax.Array  # float32; 1 keeps every token
    seed: jax.Array  # uint32


class Choice(NamedTuple):
    """A step's choice per row: token (B,) int32, its logprob (B,) and the top alternatives (B, 5)."""
    token: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def filtered_logits(logits, temperature, top_k, top_p):
    """logits (B, V) -> logits / temperature with tokens outside each row's top-k and top-p set to -inf.

    top-p keeps the smallest set of most likely tokens whose probability reaches p (the token
    that crosses p is kept), after temperature and top-k, as Hugging Face's warpers do.
    """
    v = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ranked = jnp.sort(scaled, axis=-1)[:, ::-1]  # (B, V) descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    in_top_k = jnp.arange(v)[None, :] < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better-ranked tokens
    keep = in_top_k & (before < top_p[:, None])
    threshold = jnp.take_along_axis(ranked, jnp.sum(keep, axis=-1, keepdims=True) - 1, axis=-1)  # (B, 1)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def choose(logits, settings: RowSettings, generated, vocab_size: int) -> Choice:
    """logits (B, V) float32 -> each row's next token; generated (B,) tokens its request has so far.

    Ids at or past vocab_size (the model's padded vocabulary) are never drawn. Logprobs are of the
    model's own distribution, before temperature and filtering (as vLLM and OpenAI report them).
    """
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(settings.seed, generated)
    needs_filter = jnp.any((settings.top_k > 0) | (settings.top_p < 1.0))
    sampled = jax.lax.cond(needs_filter, filtered_logits,
                           lambda x, t, *_: x / jnp.maximum(t, 1e-6)[:, None],
                           logits, settings.temperature, settings.top_k, settings.top_p)
    drawn = jax.vmap(jax.random.categorical)(keys, sampled)
    token = jnp.where(settings.temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logits.shape[-1]))
    return Choice(token, jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32),
                  top_logprobs)
