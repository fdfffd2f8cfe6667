"""`rephrase --local RUN_DIR`: the generator in this process, without HTTP (a TPU VM holding the model).

`LocalClient` answers the job as `Client` does, from one batching engine driven by its own thread as
`k2jax serve` drives it: the job's threads submit their requests and wait, so concurrent requests share
device batches. A chat prompt goes through the server's chat template and stops at its role tags. There
are no embeddings (--fidelity embedding needs a server).
"""

from __future__ import annotations

import collections
import threading

from k2jax.inference.engine import SamplingParams
from k2jax.inference.server import CHAT_STOP, chat_prompt
from k2jax.rephrase.client import GenerationError, Reply

POLL_S = 0.05  # how often a waiting request checks `cancel` and the engine thread


class LocalClient:
    """Client's interface over a run (or a `k2jax export` directory) loaded here; `model` names it
    (default: the directory's name). The engine has `max_batch` slots of `max_len` positions (default: the
    model's max_seq_len) and is warmed up before use."""

    def __init__(self, run_dir, model: str | None = None, *, endpoint: str = "chat", max_batch: int = 8,
                 max_len: int | None = None):
        from k2jax.generate import load

        run = load(run_dir)  # a CheckpointError (exit 3) for a directory that is not a run
        self.model, self.endpoint = model or run.name, endpoint
        self.engine = run.engine(max_batch=max_batch, max_len=max_len)
        self.engine.warm_up()
        self.failures: collections.Counter[str] = collections.Counter()
        self.cancel = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drive, name="k2jax-engine", daemon=True)
        self._thread.start()

    def _drive(self) -> None:
        try:
            self.engine.serve_forever(self._stop)
        except BaseException as e:  # every waiting request fails with it
            self.error = e

    def close(self) -> None:
        self._stop.set()
        self.engine.wake()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def served_models(self) -> list[str]:
        return [self.model]

    def generate(self, prompt: str, *, max_tokens: int, temperature: float = 1.0, seed: int | None = None,
                 model: str | None = None) -> Reply:
        """One completion of `prompt` (the user message for chat), batched with the other threads' requests."""
        if model not in (None, self.model):
            self._fail("rejected", f"the model {model!r} is not loaded here; this process has {self.model!r}")
        chat = self.endpoint == "chat"
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                stop=CHAT_STOP if chat else ())
        try:
            request = self.engine.submit(chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt,
                                         params)
        except ValueError as e:  # a prompt too long for the engine: what a server answers with HTTP 400
            self._fail("rejected", str(e))
        while not request.done.wait(POLL_S):
            if self.error is not None:
                self._fail("server_error", f"the engine stopped: {type(self.error).__name__}: {self.error}")
            if self.cancel.is_set():
                request.cancel()
                raise GenerationError("cancelled", "cancelled")
        done = request.completion
        return Reply(done.text, "length" if done.finish_reason == "length" else "stop", len(done.token_ids))

    def embed(self, texts: list[str]) -> list[list[float]]:
        self._fail("rejected", "--local gives no embeddings")

    def _fail(self, kind: str, message: str):
        """Count the failure (as Client does) and raise it."""
        with self._lock:
            self.failures[kind] += 1
        raise GenerationError(kind, message)
