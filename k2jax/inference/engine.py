"""The generation engine: batched prefill into a KV cache, then decoding in chunks.

A fixed set of `max_batch` slots shares one cache (B, S). Requests wait in a queue; at each
`step` the engine admits as many as there are free slots (one prefill call for all of them,
the prompts right-padded to a length bucket), then runs `decode_chunk` decode steps for every
active slot in one compiled call, then hands the new tokens to their requests and frees the
slots of requests that finished (eos, a stop string, max_tokens) or were cancelled. New
requests join between chunks: continuous batching at chunk granularity.

Compiled programs: one prefill per (batch bucket, prompt-length bucket) and one decode per
attended span bucket (powers of two up to max_len); each runs over static shapes. All the
per-slot bookkeeping (tokens, positions, budgets, sampling settings) lives on the host as
small numpy arrays passed to each call; only the cache stays on the device between calls.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import secrets
import threading
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2jax.inference import cache as cache_lib
from k2jax.inference.sampling import TOP_LOGPROBS, Choice, RowSettings, choose
from k2jax.parallel.sharding import LOGICAL_RULES

log = logging.getLogger("k2jax.inference")
MIN_BUCKET = 16  # shortest prompt-length / attended-span bucket


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is continued (OpenAI's names; temperature 0 is greedy)."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh one
    stop: tuple[str, ...] = ()  # stop strings, excluded from the text
    logprobs: int = 0  # top alternatives reported per token, 0..5
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "an integer >= 1"),
            (0.0 <= self.temperature <= 100.0, "temperature", "between 0 and 100"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**32), "seed",
             "an integer in [0, 2**32)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings"),
            (isinstance(self.logprobs, int) and 0 <= self.logprobs <= TOP_LOGPROBS, "logprobs",
             f"an integer in [0, {TOP_LOGPROBS}]"),
        ]
        for ok, field, expected in checks:
            if not ok:
                raise ValueError(f"{field} must be {expected}, got {getattr(self, field)!r}")


@dataclasses.dataclass
class Completion:
    """A finished request: the new tokens (eos and anything after a stop string excluded) and their text."""
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos or a stop string), "length" (max_tokens) or "cancelled"
    logprobs: list[float]  # each new token's log-probability under the model
    top_logprobs: list[dict[str, float]]  # per token: the params.logprobs likeliest tokens' text -> logprob
    tokens: list[str]  # each new token's text


class Request:
    """One submitted prompt; `done` is set once `completion` is ready. Thread-safe to cancel."""

    def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams, seed: int, on_update):
        self.id, self.prompt_ids, self.params, self.seed = rid, prompt_ids, params, seed
        self.on_update = on_update
        self.done = threading.Event()
        self.completion: Completion | None = None
        self.cancelled = False
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[tuple[np.ndarray, np.ndarray]] = []

    def cancel(self) -> None:
        """Stop this request: it finishes as "cancelled" and frees its slot at the engine's next step."""
        self.cancelled = True


class Engine:
    """Generates for many requests at once from one model (see the module docstring)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_len: int | None = None,
                 decode_chunk: int = 8, trained_len: int | None = None, mesh=None):
        """mesh: the mesh the model's weights live on (None: one device); the cache's slots are split
        over its batch axes (max_batch rounded up to their size), experts run over its expert axis."""
        cfg = model.cfg
        self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
        shards = batch_shards(mesh)
        self.max_batch = -(-max_batch // shards) * shards  # slots split evenly over the batch axes
        self.decode_chunk = decode_chunk
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        if max_batch < 1 or decode_chunk < 1 or self.max_len < 2:
            raise ValueError(f"max_batch ({max_batch}) and decode_chunk ({decode_chunk}) must be positive and "
                             f"max_len ({self.max_len}) at least 2")
        self.trained_len = trained_len
        self._graphdef, self._state = nnx.split(model)
        # on the mesh the weights live on (also a one-device one), so the compiled programs return the cache
        # placed as they were given it and each compiles once
        self._cache = cache_lib.new_cache(cfg, self.max_batch, self.max_len,
                                          cache_sharding(mesh if mesh is not None else _weights_mesh(self._state), cfg))
        self._slots: list[Request | None] = [None] * self.max_batch
        b = self.max_batch
        self._token, self._position, self._generated = (np.zeros(b, np.int32) for _ in range(3))
        self._budget, self._eos = np.zeros(b, np.int32), np.full(b, -1, np.int32)
        self._temperature, self._top_p = np.zeros(b, np.float32), np.ones(b, np.float32)
        self._top_k, self._seed = np.zeros(b, np.int32), np.zeros(b, np.uint32)
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._ids = itertools.count()
        self._warned_length = False
        self.stats = dict(requests=0, finished=0, prefill_batches=0, prefill_rows=0, decode_calls=0,
                          decode_steps=0, decode_rows=0, max_active=0, active=0, waiting=0)  # decode_rows: active
        # slots summed over decode calls (decode_rows / decode_calls is the mean decode batch)

    # -- submitting -------------------------------------------------------------------------------

    def submit(self, prompt, params: SamplingParams = SamplingParams(), *, on_update=None) -> Request:
        """Queue a prompt (text, encoded with bos first, or token ids). on_update(request, new_ids) is
        called from the engine's thread after each chunk that gives the request tokens."""
        params.validate()
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt has no tokens (give at least the tokenizer's bos id)")
        if any(not 0 <= i < self.cfg.vocab_size for i in ids):
            raise ValueError(f"prompt token ids must lie in [0, {self.cfg.vocab_size})")
        end = len(ids) + params.max_tokens
        if end > self.max_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {end} exceeds "
                             f"this engine's max_len {self.max_len}")
        if self.trained_len and end > self.trained_len and not self._warned_length:
            self._warned_length = True
            warnings.warn(f"generation reaches position {end}, past the {self.trained_len} tokens per row the "
                          f"model trained on (data.seq_len): positions beyond use the configured RoPE"
                          f"{'/YaRN' if self.cfg.attention.yarn else ''} and text there usually degrades",
                          stacklevel=2)
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        request = Request(next(self._ids), ids, params, seed, on_update)
        with self._wake:
            self._waiting.append(request)
            self.stats["requests"] += 1
            self._wake.notify()
        return request

    def encode(self, text: str) -> list[int]:
        """Token ids of a text prompt (`encode_prompt`)."""
        return encode_prompt(self.tokenizer, text)

    def generate(self, prompts, params: SamplingParams = SamplingParams()) -> list[Completion]:
        """Offline: complete every prompt (texts or id lists) and return their completions in order."""
        requests = [self.submit(p, params) for p in prompts]
        while self.step():
            pass
        return [r.completion for r in requests]

    def warm_up(self) -> int:
        """Compile ahead of the first requests: a one-prompt prefill and the decode chunk of every span
        bucket (16, 32, ..., max_len), each run with no active slot, so no request waits for a compile
        when its context grows into the next bucket. Returns the number of decode programs."""
        if any(r is not None for r in self._slots) or self._waiting:
            raise RuntimeError("warm_up before any request is submitted")
        self.generate([[0]], SamplingParams(max_tokens=1, temperature=0.0))
        spans = sorted({_bucket(n, MIN_BUCKET, self.max_len) for n in
                        (1 << k for k in range(self.max_len.bit_length() + 1))})
        idle = np.zeros(self.max_batch, bool)
        settings = RowSettings(self._temperature, self._top_k, self._top_p, self._seed)
        for span in spans:
            self._cache = decode_chunk_program(
                self._graphdef, self._state, self._cache, self._token, self._position, self._generated, idle,
                self._budget, self._eos, settings, steps=self.decode_chunk, span=span,
                vocab_size=self.tokenizer.vocab_size, mesh=self.mesh)[0]
        return len(spans)

    def serve_forever(self, stop: threading.Event) -> None:
        """Run steps until `stop` is set, sleeping while there is nothing to do."""
        while not stop.is_set():
            if not self.step():
                with self._wake:
                    self._wake.wait_for(lambda: self._waiting or stop.is_set(), timeout=0.5)

    def wake(self) -> None:
        """Interrupt an idle serve_forever (e.g. after setting its stop event)."""
        with self._wake:
            self._wake.notify_all()

    # -- one scheduling step ----------------------------------------------------------------------

    def step(self) -> bool:
        """Admit waiting requests, decode one chunk for every active slot, finish what is done.
        Returns whether any request is still active or waiting."""
        self._drop_cancelled()
        self._admit()
        if any(r is not None for r in self._slots):
            self._decode()
        with self._wake:
            self.stats["waiting"] = len(self._waiting)
        self.stats["active"] = sum(r is not None for r in self._slots)
        return bool(self.stats["active"] or self.stats["waiting"])

    def _drop_cancelled(self) -> None:
        for slot, request in enumerate(self._slots):
            if request is not None and request.cancelled:
                self._finish(slot, "cancelled")
        with self._wake:
            for request in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(request)
                self._complete(request, "cancelled")

    def _admit(self) -> None:
        free = [i for i, r in enumerate(self._slots) if r is None]
        with self._wake:
            batch = [self._waiting.popleft() for _ in range(min(len(free), len(self._waiting)))]
        if not batch:
            return
        n = _bucket(len(batch), 1, self.max_batch)
        length = _bucket(max(len(r.prompt_ids) for r in batch), MIN_BUCKET, self.max_len)
        tokens = np.zeros((n, length), np.int32)
        lengths = np.ones(n, np.int32)
        slots = np.full(n, self.max_batch, np.int32)  # padding rows write nowhere
        for row, (slot, request) in enumerate(zip(free, batch)):
            tokens[row, :len(request.prompt_ids)] = request.prompt_ids
            lengths[row], slots[row] = len(request.prompt_ids), slot
            self._place(slot, request)
        rows = slots[:len(batch)]
        settings = RowSettings(*(_pad(a[rows], n) for a in (self._temperature, self._top_k, self._top_p, self._seed)))
        self._cache, choice = _prefill(self._graphdef, self._state, self._cache, tokens, lengths, slots, settings,
                                       vocab_size=self.tokenizer.vocab_size, mesh=self.mesh)
        self.stats["prefill_batches"] += 1
        self.stats["prefill_rows"] += len(batch)
        choice = jax.tree.map(np.asarray, choice)
        admitted = slice(0, len(batch))
        self._token[rows], self._position[rows], self._generated[rows] = choice.token[admitted], lengths[admitted], 1
        self._take(rows, jax.tree.map(lambda a: a[None, :len(batch)], choice), np.ones((1, len(batch)), bool))
        self.stats["max_active"] = max(self.stats["max_active"], sum(r is not None for r in self._slots))

    def _place(self, slot: int, request: Request) -> None:
        p = request.params
        self._slots[slot] = request
        self._generated[slot], self._budget[slot] = 0, p.max_tokens
        eos = getattr(self.tokenizer, "eos_id", None)
        self._eos[slot] = -1 if p.ignore_eos or eos is None else eos
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = p.temperature, p.top_k, p.top_p
        self._seed[slot] = request.seed

    def _decode(self) -> None:
        active = np.array([r is not None for r in self._slots])
        steps = self.decode_chunk
        span = _bucket(int(self._position[active].max()) + steps, MIN_BUCKET, self.max_len)
        settings = RowSettings(self._temperature, self._top_k, self._top_p, self._seed)
        self._cache, choices, emitted, self._token, self._position, self._generated = (
            decode_chunk_program(self._graphdef, self._state, self._cache, self._token, self._position,
                                 self._generated, active, self._budget, self._eos, settings, steps=steps, span=span,
                                 vocab_size=self.tokenizer.vocab_size, mesh=self.mesh))
        self._token, self._position, self._generated = (np.array(a) for a in
                                                        (self._token, self._position, self._generated))
        self.stats["decode_calls"] += 1
        self.stats["decode_steps"] += steps
        self.stats["decode_rows"] += int(active.sum())
        slots = np.arange(self.max_batch)
        self._take(slots, jax.tree.map(np.asarray, choices), np.asarray(emitted))

    def _take(self, slots, choices: Choice, emitted) -> None:
        """Hand out new tokens: choices (N, len(slots)) with emitted (N, len(slots)) marking real ones."""
        for col, slot in enumerate(slots):
            request = self._slots[slot]
            if request is None:
                continue
            new = []
            for step in np.flatnonzero(emitted[:, col]):
                token = int(choices.token[step, col])
                if token == self._eos[slot]:
                    self._emit(request, new)
                    self._finish(slot, "stop")
                    break
                new.append(token)
                request.token_ids.append(token)
                request.logprobs.append(float(choices.logprob[step, col]))
                request.top.append((choices.top_ids[step, col], choices.top_logprobs[step, col]))
                if self._hit_stop(request):
                    self._emit(request, new)
                    self._finish(slot, "stop")
                    break
                if len(request.token_ids) >= request.params.max_tokens:
                    self._emit(request, new)
                    self._finish(slot, "length")
                    break
            else:
                self._emit(request, new)

    @staticmethod
    def _emit(request: Request, new: list[int]) -> None:
        if new and request.on_update is not None:
            request.on_update(request, new)

    def _hit_stop(self, request: Request) -> bool:
        """Whether the newest token completes a stop string: only the tail that can hold one is decoded
        (a character takes at most 4 byte tokens), so checking stays O(1) per token."""
        stops = request.params.stop
        if not stops:
            return False
        tail = self.tokenizer.decode(request.token_ids[-(4 * max(map(len, stops)) + 4):])
        return any(s in tail for s in stops)

    def _finish(self, slot: int, reason: str) -> None:
        request = self._slots[slot]
        self._slots[slot] = None
        self._position[slot] = self._generated[slot] = 0
        self._complete(request, reason)

    def _complete(self, request: Request, reason: str) -> None:
        text = self.tokenizer.decode(request.token_ids)
        ids = request.token_ids
        if request.params.stop and reason == "stop":
            cut = min((text.find(s) for s in request.params.stop if s in text), default=-1)
            if cut >= 0:
                text, ids = text[:cut], _tokens_within(self.tokenizer, ids, cut)
        k = request.params.logprobs
        top = [{self.tokenizer.decode([int(i)]): float(lp) for i, lp in zip(t_ids[:k], t_lps[:k])}
               for t_ids, t_lps in request.top[:len(ids)]] if k else []
        request.completion = Completion(
            prompt_ids=list(request.prompt_ids), token_ids=list(ids), text=text, finish_reason=reason,
            logprobs=request.logprobs[:len(ids)], top_logprobs=top,
            tokens=[self.tokenizer.decode([i]) for i in ids])
        self.stats["finished"] += 1
        log.debug("request %d finished (%s): %d prompt + %d new tokens", request.id, reason,
                  len(request.prompt_ids), len(ids))
        request.done.set()


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids the model is given for a text prompt: the tokenizer's bos first, where it has one."""
    bos = getattr(tokenizer, "bos_id", None)
    return ([bos] if bos is not None else []) + [int(i) for i in tokenizer.encode(text)]


def _tokens_within(tokenizer, ids: list[int], chars: int) -> list[int]:
    """The shortest prefix of ids whose text covers the first `chars` characters (the text before a
    stop string); a token that straddles the stop string is kept."""
    for n in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:n])) >= chars:
            return ids[:n]
    return ids


def _bucket(n: int, smallest: int, largest: int) -> int:
    """The power of two >= n (at least `smallest`), capped at `largest`."""
    return min(max(smallest, 1 << max(n - 1, 0).bit_length()), largest)


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    """a (m,) -> (n,), repeating its first value (padding rows of a prefill batch)."""
    return np.concatenate([a, np.repeat(a[:1], n - len(a))])


def _batch_axes(mesh) -> tuple[str, ...]:
    return tuple(a for a in LOGICAL_RULES["batch"] if mesh is not None and mesh.shape[a] > 1)


def _weights_mesh(state):
    """The mesh the weights are placed on (None for weights on one device without a mesh)."""
    sharding = getattr(jax.tree.leaves(state)[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None


def batch_shards(mesh) -> int:
    return math.prod(mesh.shape[a] for a in _batch_axes(mesh))


def cache_sharding(mesh, cfg):
    """The cache's sharding on a mesh: slots split over the batch axes, everything else whole
    (splitting MLA's heads would duplicate the latent; SGLang shards decode attention by batch too)."""
    if mesh is None:
        return None
    axes = _batch_axes(mesh)  # no trailing Nones: the spec compiled programs give their outputs
    spec = [None] * (cache_lib.seq_axis(cfg) - 1) + [axes] if axes else []
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


@partial(jax.jit, static_argnames=("graphdef", "vocab_size", "mesh"), donate_argnames=("cache",))
def _prefill(graphdef, state, cache, tokens, lengths, slots, settings: RowSettings, *, vocab_size: int, mesh):
    """Run the prompts (n, P) (right-padded; lengths (n,)), write their entries into `slots`, and
    choose each one's first new token from the logits at its last prompt position."""
    model = nnx.merge(graphdef, state)
    n, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)  # 0 marks padding
    logits, entries = model.prefill(tokens, positions, segment_ids, mesh=mesh)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # (n, V)
    choice = choose(last, settings, jnp.zeros(n, jnp.int32), vocab_size)
    return cache_lib.insert(cache, entries, slots, model.cfg), choice


@partial(jax.jit, static_argnames=("graphdef", "steps", "span", "vocab_size", "mesh"), donate_argnames=("cache",))
def decode_chunk_program(graphdef, state, cache, token, position, generated, active, budget, eos,
                         settings: RowSettings, *, steps: int, span: int, vocab_size: int, mesh):
    """`steps` decode steps for every slot over the cache's first `span` positions.

    token (B,) sits at position (B,) and is written there; a slot stops (stays inactive for the rest
    of the chunk) on eos or when it has `budget` tokens. Returns the cache, the choices (steps, B),
    which of them were emitted (steps, B), and the next token, position and generated count."""
    cfg = nnx.merge(graphdef, state).cfg

    def body(carry, _):
        part, token, position, generated, active, state = carry  # the weights ride in the carry: nnx refuses
        model = nnx.merge(graphdef, state)  # variables from an outer trace
        logits, part = model.decode(token[:, None], position[:, None], active[:, None], part, mesh=mesh)
        choice = choose(logits[:, 0], settings, generated, vocab_size)
        generated = generated + active
        going = active & (choice.token != eos) & (generated < budget)
        token = jnp.where(active, choice.token, token)
        return (part, token, position + going, generated, going, state), (choice, active)

    carry = (cache_lib.window(cache, span, cfg), token, position, generated, active, state)
    (part, token, position, generated, _, _), (choices, emitted) = jax.lax.scan(body, carry, length=steps)
    return cache_lib.put_window(cache, part, cfg), choices, emitted, token, position, generated
