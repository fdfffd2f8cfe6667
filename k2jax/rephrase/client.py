"""A client of an OpenAI-compatible server (vLLM, SGLang, JetStream, `k2jax serve`) that retries.

Every failed request is counted by kind and retried with exponential backoff and jitter
(honouring a Retry-After header), up to `retries` times:

  rate_limited   HTTP 429            server_error   HTTP 5xx
  timeout        no reply in time    connection     refused, reset, ...
  incomplete     the connection closed in the middle of the reply
  malformed      a reply that is not JSON, or lacks the text (or embedding) it must carry

Another HTTP status (400: a prompt too long, an unknown model) is not retried: its kind
is "rejected". A request that does not succeed raises GenerationError; a reply that
failed is never returned. The client is thread-safe (one httpx connection pool); setting
`cancel` ends the backoff waits of every request at once (GenerationError "cancelled").
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import threading

import httpx2 as httpx

TRANSIENT = ("rate_limited", "server_error", "timeout", "connection", "incomplete", "malformed")


class GenerationError(Exception):
    """A request that failed `retries + 1` times (or once, when not worth retrying)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str
    completion_tokens: int


class Client:
    """Completions (`endpoint="completions"`) or chat completions (`"chat"`) of `model` at `base_url`
    (e.g. http://127.0.0.1:8000/v1)."""

    def __init__(self, base_url: str, model: str, *, endpoint: str = "chat", api_key: str | None = None,
                 timeout: float = 120.0, retries: int = 6, backoff: float = 1.0, max_backoff: float = 60.0):
        if endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be 'chat' or 'completions', got {endpoint!r}")
        self.base_url, self.model, self.endpoint = base_url.rstrip("/"), model, endpoint
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout, headers=headers)
        self._lock = threading.Lock()
        self.failures: collections.Counter[str] = collections.Counter()
        self.cancel = threading.Event()
        self.requests = 0

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def served_models(self) -> list[str]:
        """The model ids of GET /models, one try: a GenerationError if the server cannot be reached."""
        try:
            response = self._http.get(f"{self.base_url}/models")
            response.raise_for_status()
            return [m["id"] for m in response.json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            raise GenerationError("connection", f"no OpenAI-compatible server answers at {self.base_url}/models "
                                  f"({type(e).__name__}: {e})") from None

    def generate(self, prompt: str, *, max_tokens: int, temperature: float = 1.0, seed: int | None = None,
                 model: str | None = None) -> Reply:
        """One completion of `prompt` (sent as the user message for chat) by `model` (default: the client's)."""
        body = {"model": model or self.model, "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
            path = "chat/completions"
        else:
            body["prompt"] = prompt
            path = "completions"
        return self._post(path, body, self._reply)

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Embeddings of `texts` from POST /embeddings, in order."""
        return self._post("embeddings", {"model": self.model, "input": texts}, _embeddings)

    def _reply(self, data: dict) -> Reply:
        choice = data["choices"][0]
        text = choice["message"]["content"] if self.endpoint == "chat" else choice["text"]
        if not isinstance(text, str):
            raise TypeError(f"the reply's text is {type(text).__name__}")
        tokens = (data.get("usage") or {}).get("completion_tokens", 0)
        return Reply(text, str(choice.get("finish_reason")), int(tokens))

    def _post(self, path: str, body: dict, parse):
        url = f"{self.base_url}/{path}"
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                with self._lock:
                    self.requests += 1
                response = self._http.post(url, json=body)
                if response.status_code == 200:
                    return parse(json.loads(response.content))
                if response.status_code == 429 or response.status_code >= 500:
                    kind = "rate_limited" if response.status_code == 429 else "server_error"
                    retry_after = _seconds(response.headers.get("retry-after"))
                    error = f"HTTP {response.status_code}: {response.text[:200]}"
                else:
                    self._count("rejected")
                    raise GenerationError("rejected", f"{url}: HTTP {response.status_code}: {response.text[:300]}")
            except httpx.TimeoutException as e:
                kind, error = "timeout", f"{type(e).__name__}: {e}"
            except httpx.RemoteProtocolError as e:
                kind, error = "incomplete", f"{type(e).__name__}: {e}"
            except httpx.TransportError as e:
                kind, error = "connection", f"{type(e).__name__}: {e}"
            except (ValueError, KeyError, IndexError, TypeError) as e:  # json.JSONDecodeError is a ValueError
                kind, error = "malformed", f"{type(e).__name__}: {e}"
            self._count(kind)
            if attempt < self.retries:
                delay = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
                if self.cancel.wait(min(self.max_backoff, max(delay, retry_after or 0.0))):
                    raise GenerationError("cancelled", f"{url}: cancelled after {kind}: {error}")
        raise GenerationError(kind, f"{url}: {self.retries + 1} tries failed, the last: {kind}: {error}")

    def _count(self, kind: str) -> None:
        with self._lock:
            self.failures[kind] += 1


def _embeddings(data: dict) -> list[list[float]]:
    rows = sorted(data["data"], key=lambda row: row["index"])
    return [[float(x) for x in row["embedding"]] for row in rows]


def _seconds(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
