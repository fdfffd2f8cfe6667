"""Load a trained run and sample text from it.

`load_run(run_dir)` rebuilds the model from the run's config.yaml, restores the
latest (or a given) checkpoint onto this machine's devices (one mesh over all of
them, whatever mesh trained it) and loads the run's tokenizer. `sample` draws
tokens autoregressively: every step runs the model over a fixed-size buffer (one
compilation; causal attention means the unwritten tail never reaches the position
being read), so it is O(new tokens x length): meant for small models and short
completions, not serving.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2jax.config import Config, MeshConfig, load_config
from k2jax.data import tokenizer as tokenizer_lib
from k2jax.model.transformer import Transformer
from k2jax.train.checkpoint import Checkpointer, CheckpointError
from k2jax.train.step import abstract_state, init_train_state


@dataclasses.dataclass
class LoadedRun:
    model: Transformer
    tokenizer: object
    config: Config
    step: int

    def prompt_ids(self, prompt: str) -> np.ndarray:
        """The ids the model is given for `prompt` (bos first, where the tokenizer has one)."""
        ids = self.tokenizer.encode(prompt)
        return np.concatenate([[self.tokenizer.bos_id], ids]) if self.tokenizer.bos_id is not None else ids

    def complete(self, prompt: str, max_new_tokens: int = 64, *, temperature: float = 0.8,
                 top_k: int | None = None, seed: int = 0) -> str:
        """The prompt's continuation as text."""
        new = sample(self.model, self.prompt_ids(prompt), max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                     vocab_size=self.tokenizer.vocab_size)
        return self.tokenizer.decode(new)


def load_run(run_dir: str | Path, step: int | None = None) -> LoadedRun:
    """The model and tokenizer of a run directory written by `k2jax train`."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = dataclasses.replace(load_config(run_dir / "config.yaml"), mesh=MeshConfig())
    setup, state = init_train_state(cfg)
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    try:
        state, _, _ = ckpt.restore(abstract_state(setup, state), step)
    finally:
        ckpt.close()
    model = nnx.merge(setup.graphdef, state["params"], state["model_state"])
    return LoadedRun(model, tokenizer_lib.load(run_dir / "tokenizer"), cfg, int(state["step"]))


def sample(model: Transformer, prompt_ids, max_new_tokens: int, *, temperature: float = 0.8,
           top_k: int | None = None, seed: int = 0, vocab_size: int | None = None) -> np.ndarray:
    """`max_new_tokens` ids following `prompt_ids` (1-D); temperature 0 is greedy.

    vocab_size: draw only ids below it (the tokenizer's size; the model's padded vocabulary
    may be larger, and those ids decode to nothing).
    """
    prompt = np.asarray(prompt_ids, np.int32).reshape(-1)
    if prompt.size == 0:
        raise ValueError("sample needs at least one prompt token (e.g. the tokenizer's bos id)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    length = prompt.size + max_new_tokens
    if length > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({prompt.size}) + new tokens ({max_new_tokens}) exceed the model's "
                         f"max_seq_len {model.cfg.max_seq_len}")
    buffer = jnp.zeros((1, length), jnp.int32).at[0, :prompt.size].set(prompt)
    graphdef, state = nnx.split(model)
    out = _sample_loop(graphdef, state, buffer, prompt.size, jax.random.key(seed),
                       temperature=float(temperature), top_k=top_k, vocab_size=vocab_size)
    return np.asarray(out[0, prompt.size:])


@partial(jax.jit, static_argnames=("graphdef", "start", "temperature", "top_k", "vocab_size"))
def _sample_loop(graphdef, state, buffer, start: int, key, *, temperature: float, top_k: int | None,
                 vocab_size: int | None):
    def body(t, carry):  # writes position t from the logits at t - 1
        buffer, key, state = carry  # the weights ride in the carry: nnx refuses variables from an outer trace
        logits = nnx.merge(graphdef, state)(buffer)[0][0, t - 1]  # (V,)
        if vocab_size is not None:
            logits = jnp.where(jnp.arange(logits.shape[0]) < vocab_size, logits, -jnp.inf)
        key, draw = jax.random.split(key)
        if temperature == 0.0:
            token = jnp.argmax(logits)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = jax.lax.top_k(logits, top_k)[0][-1]
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            token = jax.random.categorical(draw, logits)
        return buffer.at[0, t].set(token.astype(jnp.int32)), key, state

    buffer, _, _ = jax.lax.fori_loop(start, buffer.shape[1], body, (buffer, key, state))
    return buffer
