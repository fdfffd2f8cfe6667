"""`k2jax serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the batching engine.

Endpoints (the OpenAI API as vLLM, SGLang and JetStream speak it):

  GET  /health                answers at once, even during a long generation: the engine runs in its own
                              thread, the HTTP server in the asyncio loop
  GET  /v1/models             the served model: the run directory's name or --served-model-name
  POST /v1/completions        prompt: a string, a list of strings, a list of token ids or a list of those;
                              max_tokens (default 16), temperature, top_p, top_k (an extension), n, stop
                              (a string or a list), seed, logprobs (0..5: the legacy object with tokens,
                              token_logprobs, top_logprobs, text_offset), stream (server-sent events), echo
                              (false only), ignore_eos (an extension)
  POST /v1/chat/completions   messages through the chat template below; n, stop, seed, max_tokens or
                              max_completion_tokens (default: the rest of the context), temperature, top_p,
                              top_k, logprobs + top_logprobs (0..5), stream
  GET  /stats                 a k2jax extension: the engine's counters (engine.stats: requests, finished,
                              prefill_batches, prefill_rows, decode_calls, decode_steps, decode_rows,
                              max_active, active, waiting) as JSON

With n > 1 and a seed, choice i draws with seed + i (mod 2**32); without one, each draws with a fresh seed.

Batching: every request (each of its n choices, each prompt of a list) becomes one engine request. The
engine batches continuously at decode-chunk boundaries: waiting requests join free slots together (one
batched prefill), one decode chunk runs for all active slots at once, and each slot stops on its own (eos,
a stop string, max_tokens). Concurrent HTTP requests therefore share device batches.

Chat template (the repository's tokenizers have none): each message is its role tag on a line of its own,
then its content on the next line(s); the prompt ends with the assistant tag, which the model continues:

    <|system|>
    You are terse.
    <|user|>
    Hello
    <|assistant|>

("developer" is written as system). Generation stops at the next role tag (CHAT_STOP, with the newline
before it when there is one), in addition to any stop strings of the request.

Errors are OpenAI's: HTTP 400 with {"error": {"message", "type": "invalid_request_error", "param",
"code"}} for a malformed request (a missing field, a wrong type, a value out of range, an unknown model,
a prompt plus max_tokens longer than the engine's max_len, an unsupported option). A client that
disconnects cancels its engine requests, which frees their slots at the engine's next step.

Streaming sends text as it is decoded (held back where it could be the start of a stop string or an
unfinished UTF-8 character); the concatenated deltas equal the non-streamed text. With logprobs, a
streamed choice carries its tokens' log-probabilities in its last chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
import uuid
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2jax.inference.engine import SamplingParams
from k2jax.inference.sampling import TOP_LOGPROBS as MAX_LOGPROBS  # alternatives per token the engine returns

log = logging.getLogger("k2jax.serve")

MAX_N = 64                # choices per request
MAX_STOP = 16             # stop strings per request (OpenAI: 4)
POLL_S = 0.01             # how often a waiting handler checks its requests and its client
CHAT_ROLES = ("system", "user", "assistant")
CHAT_STOP = tuple(f"\n<|{r}|>" for r in CHAT_ROLES) + tuple(f"<|{r}|>" for r in CHAT_ROLES)


def chat_prompt(messages: list[dict]) -> str:
    """The text the model continues for a chat (see the module docstring)."""
    lines = []
    for m in messages:
        role = "system" if m["role"] == "developer" else m["role"]
        lines += [f"<|{role}|>", m["content"]]
    return "\n".join([*lines, "<|assistant|>", ""])


# ----------------------------------------------------------------------------------------- request bodies

class _Body(BaseModel):
    # strict: "5" is not 5 and true is not 1 (OpenAI refuses them too); unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Common(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)                # extension (vLLM's); 0 or -1: off
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False                       # extension (vLLM's)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


_UNIONS = {"prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
           "stop": "a string or a list of strings",
           "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts"}


# ----------------------------------------------------------------------------------------------- errors

class APIError(Exception):
    """An error answered with OpenAI's body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors: the first offending field, and what it must be."""
    first = errors[0]
    loc = [str(x) for x in first["loc"]]
    if loc and loc[0] == "body":
        loc = loc[1:]
    if first["type"] == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})", None
    if not loc:
        return f"the request body must be a JSON object ({first['msg']})", None
    # a union's errors come one per member (prompt.str, prompt.list[str], ...): say what the field may be
    same = [e for e in errors if [str(x) for x in e["loc"]][1:2] == loc[:1]]
    path, field = [], None
    for part in loc:
        if part in _UNIONS and len(same) > 1:
            field = part
            path.append(part)
            break
        if "[" in part or part in ("str", "int", "float", "bool"):  # a union member's name, not a field
            break
        path.append(part)
    param = ".".join(path)
    if field is not None:
        return f"'{param}' must be {_UNIONS[field]}", param
    if first["type"] == "missing":
        return f"'{param}' is required", param
    return f"'{param}': {first['msg']}" + (f" (got {first['input']!r})" if "input" in first and
                                            not isinstance(first["input"], (dict, list)) else ""), param


# ------------------------------------------------------------------------------------------------ choices

class _Choice:
    """One engine request and what has been streamed of it."""

    def __init__(self, index: int, prompt_index: int, prompt_text: str, stops: tuple[str, ...]):
        self.index, self.prompt_index, self.prompt_text, self.stops = index, prompt_index, prompt_text, stops
        self.request = None
        self.ids: list[int] = []  # tokens decoded so far (streaming; the engine passes on no eos)
        self.sent = ""  # text streamed so far

    @property
    def completion(self):
        return self.request.completion

    def delta(self, tokenizer, ids: list[int]) -> str:
        """New text that is certain to be part of the final text, given the tokens so far (streaming)."""
        text = tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        else:  # hold back an unfinished character and what could be the start of a stop string
            text = text.rstrip("\ufffd")
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    def final_delta(self) -> str:
        text = self.completion.text
        if not text.startswith(self.sent):
            log.warning("streamed text %r is not a prefix of the final text %r", self.sent[-40:], text[:80])
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


def _finish_reason(completion) -> str:
    return "length" if completion.finish_reason == "length" else "stop"


def _completion_logprobs(choice: _Choice) -> dict:
    """OpenAI's legacy logprobs object; text_offset counts from the start of the prompt, as OpenAI's does."""
    c = choice.completion
    offsets, at = [], len(choice.prompt_text)
    for token in c.tokens:
        offsets.append(at)
        at += len(token)
    top = []
    for token, lp, alternatives in zip(c.tokens, c.logprobs, c.top_logprobs or [{}] * len(c.tokens)):
        d = {k: float(v) for k, v in alternatives.items()}
        d.setdefault(token, float(lp))  # the chosen token is always there (up to logprobs + 1 entries)
        top.append(d)
    return {"tokens": list(c.tokens), "token_logprobs": [float(x) for x in c.logprobs], "top_logprobs": top,
            "text_offset": offsets}


def _chat_logprobs(choice: _Choice, top_n: int) -> dict:
    c = choice.completion
    content = []
    for i, (token, lp) in enumerate(zip(c.tokens, c.logprobs)):
        alternatives = (c.top_logprobs[i] if c.top_logprobs else {}) if top_n else {}
        content.append({"token": token, "logprob": float(lp), "bytes": list(token.encode("utf-8")),
                        "top_logprobs": [{"token": t, "logprob": float(v), "bytes": list(t.encode("utf-8"))}
                                         for t, v in list(alternatives.items())[:top_n]]})
    return {"content": content, "refusal": None}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# ------------------------------------------------------------------------------------------------- server

class _ClientGone(Exception):
    pass


class OpenAIServer:
    """The FastAPI app (`.app`) over an engine; the engine thread runs while the app does (its lifespan)."""

    def __init__(self, engine, tokenizer, model_name: str, *, stats_every: float = 10.0):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.stats_every = stats_every
        self.created = int(time.time())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.engine_error: BaseException | None = None
        self.app = self._build_app()

    # ---------------------------------------------------------------------------------- engine thread
    def start_engine(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_engine, name="k2jax-engine", daemon=True)
            self._thread.start()

    def stop_engine(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if hasattr(self.engine, "wake"):  # out of its idle wait at once
            self.engine.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run_engine(self) -> None:
        try:
            self.engine.serve_forever(self._stop)
        except BaseException as e:  # every waiting handler answers 500 from now on; /health says 503
            self.engine_error = e
            log.exception("the engine thread stopped")

    def _check_engine(self) -> None:
        if self.engine_error is not None:
            raise APIError(f"the engine stopped: {type(self.engine_error).__name__}: {self.engine_error}",
                           status=500, kind="server_error")

    def stats(self) -> dict:
        def plain(v):
            return v.item() if hasattr(v, "item") else v
        return {k: plain(v) for k, v in dict(self.engine.stats).items()}

    async def _log_stats(self) -> None:
        """Every stats_every seconds while anything changed: the engine's counters and its batch sizes."""
        last: dict = {}
        while True:
            await asyncio.sleep(self.stats_every)
            s = self.stats()
            if s == last:
                continue
            d = {k: v - last.get(k, 0) for k, v in s.items() if isinstance(v, (int, float))}
            log.info("engine: %d active, %d waiting; in the last %.0f s: %d requests, %d prefill batches "
                     "(%.1f prompts each), %d decode calls (%.1f rows each); max active so far %d",
                     s.get("active", 0), s.get("waiting", 0), self.stats_every, d.get("requests", 0),
                     d.get("prefill_batches", 0), d.get("prefill_rows", 0) / max(d.get("prefill_batches", 0), 1),
                     d.get("decode_calls", 0), d.get("decode_rows", 0) / max(d.get("decode_calls", 0), 1),
                     s.get("max_active", 0))
            last = s

    # ------------------------------------------------------------------------------------ the app
    def _build_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.start_engine()
            logger = asyncio.create_task(self._log_stats())
            try:
                yield
            finally:
                logger.cancel()
                self.stop_engine()

        app = FastAPI(title="k2jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError):
            message, param = _validation_message(list(exc.errors()))
            log.info("400 %s %s: %s", request.method, request.url.path, message)
            return _error(400, message, param=param)

        @app.exception_handler(APIError)
        async def api_error(request: Request, exc: APIError):
            log.info("%d %s %s: %s", exc.status, request.method, request.url.path, exc.message)
            return _error(exc.status, exc.message, exc.kind, exc.param, exc.code)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException):
            return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                          "invalid_request_error" if exc.status_code < 500 else "server_error")

        @app.exception_handler(Exception)
        async def unexpected(request: Request, exc: Exception):
            log.exception("500 %s %s", request.method, request.url.path)
            return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

        @app.get("/health")
        async def health():
            if self.engine_error is not None:
                return _error(503, f"the engine stopped: {self.engine_error}", "server_error")
            return {"status": "ok"}

        @app.get("/stats")
        async def stats():
            return self.stats()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{name:path}")
        async def model(name: str):
            if name != self.model_name:
                raise APIError(f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                               "model", "model_not_found", status=404)
            return self._model_card()

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request):
            return await self._completions(body, request)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatRequest, request: Request):
            return await self._chat(body, request)

        return app

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "k2jax",
                "max_model_len": self.engine.max_len}

    # ---------------------------------------------------------------------------- shared checks
    def _check_common(self, body: _Common) -> None:
        if body.model is not None and body.model != self.model_name:
            raise APIError(f"the model '{body.model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(f"'{name}' is not supported (only 0)", name, "unsupported_parameter")
        if body.logit_bias:
            raise APIError("'logit_bias' is not supported", "logit_bias", "unsupported_parameter")
        if body.stream_options is not None and not body.stream:
            raise APIError("'stream_options' is only allowed with stream: true", "stream_options")

    def _stops(self, stop) -> tuple[str, ...]:
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > MAX_STOP:
            raise APIError(f"'stop' may hold at most {MAX_STOP} strings, got {len(stops)}", "stop")
        if any(s == "" for s in stops):
            raise APIError("'stop' strings must not be empty", "stop")
        return stops

    def _prompt_len(self, prompt: str | list[int]) -> int:
        """Tokens the engine will see for a prompt (for text: bos first, where the tokenizer has one)."""
        return len(prompt) if isinstance(prompt, list) else len(self.engine.encode(prompt))

    def _check_length(self, prompt_len: int, max_tokens: int, param: str) -> None:
        limit = self.engine.max_len
        if prompt_len + max_tokens > limit:
            raise APIError(f"this model's maximum context length is {limit} tokens; you requested "
                           f"{prompt_len + max_tokens} ({prompt_len} in the {param}, {max_tokens} for the "
                           "completion): shorten the prompt or lower max_tokens",
                           "max_tokens" if prompt_len < limit else param, "context_length_exceeded")

    def _params(self, body: _Common, max_tokens: int, stops: tuple[str, ...], logprobs: int, j: int):
        temperature = 1.0 if body.temperature is None else body.temperature
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                  top_k=max(body.top_k or 0, 0), top_p=1.0 if body.top_p is None else body.top_p,
                                  seed=None if body.seed is None else (body.seed + j) % 2**32, stop=stops,
                                  logprobs=logprobs, ignore_eos=bool(body.ignore_eos))
        except ValueError as e:
            raise APIError(str(e)) from None

    def _submit(self, choices: list[_Choice], prompts: list, params: list, on_update) -> None:
        """Submits every choice; if one is refused, cancels those already submitted."""
        try:
            for c, p, sp in zip(choices, prompts, params):
                c.request = self.engine.submit(p, sp, on_update=on_update)
        except ValueError as e:
            for c in choices:
                if c.request is not None:
                    c.request.cancel()
            raise APIError(str(e)) from None

    async def _wait(self, choices: list[_Choice], request: Request) -> None:
        """Until every choice is done; a client that disconnects meanwhile cancels them."""
        checked = 0.0
        while not all(c.request.done.is_set() for c in choices):
            self._check_engine()
            now = time.monotonic()
            if now - checked > 0.1:
                checked = now
                if await request.is_disconnected():
                    raise _ClientGone()
            await asyncio.sleep(POLL_S)

    def _cancel(self, rid: str, choices: list[_Choice], started: float, why: str) -> None:
        pending = [c for c in choices if c.request is not None and not c.request.done.is_set()]
        for c in pending:
            c.request.cancel()
        if pending:
            log.info("%s: %s after %.2f s; cancelled %d engine request(s)", rid, why, time.monotonic() - started,
                     len(pending))

    def _log_done(self, rid: str, choices: list[_Choice], prompt_tokens: int, started: float) -> int:
        completion_tokens = sum(len(c.completion.token_ids) for c in choices)
        reasons = sorted({c.completion.finish_reason for c in choices})
        log.info("%s: %d choice(s), prompt %d tokens, completion %d tokens, %.2f s, finish %s", rid,
                 len(choices), prompt_tokens, completion_tokens, time.monotonic() - started, ",".join(reasons))
        return completion_tokens

    @staticmethod
    def _prompt_tokens(choices: list[_Choice]) -> int:
        seen = {}
        for c in choices:  # each prompt counts once, whatever n
            seen.setdefault(c.prompt_index, len(c.completion.prompt_ids))
        return sum(seen.values())

    # ------------------------------------------------------------------------------- completions
    async def _completions(self, body: CompletionRequest, request: Request):
        started = time.monotonic()
        self._check_common(body)
        if body.echo:
            raise APIError("'echo' is not supported (only false)", "echo", "unsupported_parameter")
        if body.suffix:
            raise APIError("'suffix' is not supported", "suffix", "unsupported_parameter")
        n = body.n or 1
        if body.best_of is not None and body.best_of != n:
            raise APIError("'best_of' is not supported (only equal to n)", "best_of", "unsupported_parameter")
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError("'prompt' must not be an empty list", "prompt")
        if any(isinstance(p, list) and not p for p in prompts):
            raise APIError("a token-id prompt must not be empty", "prompt")
        vocab = getattr(self.tokenizer, "vocab_size", None)
        for p in prompts:
            if isinstance(p, list) and any(t < 0 or (vocab is not None and t >= vocab) for t in p):
                raise APIError(f"token ids must lie in [0, {vocab})", "prompt")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        for p in prompts:
            self._check_length(self._prompt_len(p), max_tokens, "prompt")
        stops = self._stops(body.stop)
        logprobs = body.logprobs
        rid = f"cmpl-{uuid.uuid4().hex}"
        choices, engine_prompts, params = [], [], []
        for i, p in enumerate(prompts):
            text = p if isinstance(p, str) else self.tokenizer.decode(p)
            for j in range(n):
                choices.append(_Choice(len(choices), i, text, stops))
                engine_prompts.append(p)
                params.append(self._params(body, max_tokens, stops, logprobs or 0, j))
        created = int(time.time())

        def chunk(choice_list, usage=None):
            out = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                   "choices": choice_list}
            if usage is not None or _include_usage(body):
                out["usage"] = usage
            return out

        if body.stream:
            def piece(c: _Choice, text: str, final: bool) -> dict:
                return {"index": c.index, "text": text,
                        "logprobs": _completion_logprobs(c) if final and logprobs is not None else None,
                        "finish_reason": _finish_reason(c.completion) if final else None}
            return self._streaming(rid, choices, engine_prompts, params, started, chunk, piece, None,
                                   _include_usage(body))

        if not await self._run_to_end(rid, choices, engine_prompts, params, request, started):
            return Response(status_code=499)  # the client is gone: nobody reads it
        prompt_tokens = self._prompt_tokens(choices)
        completion_tokens = self._log_done(rid, choices, prompt_tokens, started)
        return chunk([{"index": c.index, "text": c.completion.text,
                       "logprobs": _completion_logprobs(c) if logprobs is not None else None,
                       "finish_reason": _finish_reason(c.completion)} for c in choices],
                     usage=_usage(prompt_tokens, completion_tokens))

    # -------------------------------------------------------------------------------------- chat
    async def _chat(self, body: ChatRequest, request: Request):
        started = time.monotonic()
        self._check_common(body)
        if body.tools:
            raise APIError("'tools' are not supported", "tools", "unsupported_parameter")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError("'response_format' other than text is not supported", "response_format",
                           "unsupported_parameter")
        if body.top_logprobs and not body.logprobs:
            raise APIError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            if content is None:
                raise APIError(f"'messages.{i}.content' is required", f"messages.{i}.content")
            messages.append({"role": m.role, "content": content})
        prompt = chat_prompt(messages)
        prompt_len = self._prompt_len(prompt)
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise APIError("'max_tokens' and 'max_completion_tokens' differ; give one", "max_tokens")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # the rest of the context
            if prompt_len >= self.engine.max_len:
                self._check_length(prompt_len, 1, "messages")
            max_tokens = self.engine.max_len - prompt_len
        self._check_length(prompt_len, max_tokens, "messages")
        user_stops = self._stops(body.stop)
        stops = user_stops + tuple(s for s in CHAT_STOP if s not in user_stops)
        n = body.n or 1
        top_n = (body.top_logprobs or 0) if body.logprobs else 0
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        choices = [_Choice(j, 0, prompt, stops) for j in range(n)]
        params = [self._params(body, max_tokens, stops, top_n, j) for j in range(n)]
        created = int(time.time())

        def chunk(choice_list, usage=None, stream=True):
            out = {"id": rid, "object": "chat.completion.chunk" if stream else "chat.completion",
                   "created": created, "model": self.model_name, "choices": choice_list}
            if usage is not None or _include_usage(body):
                out["usage"] = usage
            return out

        if body.stream:
            def piece(c: _Choice, text: str, final: bool) -> dict:
                return {"index": c.index, "delta": {"content": text} if text or not final else {},
                        "logprobs": _chat_logprobs(c, top_n) if final and body.logprobs else None,
                        "finish_reason": _finish_reason(c.completion) if final else None}
            first = [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for c in choices]
            return self._streaming(rid, choices, [prompt] * n, params, started, chunk, piece, first,
                                   _include_usage(body))

        if not await self._run_to_end(rid, choices, [prompt] * n, params, request, started):
            return Response(status_code=499)  # the client is gone: nobody reads it
        prompt_tokens = self._prompt_tokens(choices)
        completion_tokens = self._log_done(rid, choices, prompt_tokens, started)
        return chunk([{"index": c.index, "message": {"role": "assistant", "content": c.completion.text},
                       "logprobs": _chat_logprobs(c, top_n) if body.logprobs else None,
                       "finish_reason": _finish_reason(c.completion)} for c in choices],
                     usage=_usage(prompt_tokens, completion_tokens), stream=False)

    async def _run_to_end(self, rid, choices, prompts, params, request: Request, started: float) -> bool:
        """Submit the choices and wait for them all; False (their requests cancelled) if the client left."""
        self._submit(choices, prompts, params, None)
        try:
            await self._wait(choices, request)
        except _ClientGone:
            self._cancel(rid, choices, started, "client disconnected")
            return False
        except BaseException:  # the engine stopped, or the server is shutting down
            self._cancel(rid, choices, started, "request stopped")
            raise
        return True

    # --------------------------------------------------------------------------------- streaming
    def _streaming(self, rid, choices, prompts, params, started, chunk, piece, first, include_usage):
        """Submits (a refusal is still a 400) and returns the server-sent-event response."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        by_request: dict[int, _Choice] = {}
        lock = threading.Lock()
        early: dict[int, list[int]] = {}  # updates that arrive before submit has returned

        def on_update(req, new_ids) -> None:  # the engine thread; must never raise
            try:
                with lock:
                    c = by_request.get(id(req))
                    (c.ids if c is not None else early.setdefault(id(req), [])).extend(int(t) for t in new_ids)
                loop.call_soon_threadsafe(wake.set)
            except Exception:  # the loop has closed: the client is long gone
                pass

        self._submit(choices, prompts, params, on_update)
        with lock:
            for c in choices:
                by_request[id(c.request)] = c
                c.ids.extend(early.pop(id(c.request), []))

        async def events():
            try:
                if first:
                    yield _sse(chunk(first))
                pending = list(choices)
                while pending:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(wake.wait(), timeout=0.05)
                    wake.clear()
                    if self.engine_error is not None:
                        yield _sse({"error": {"message": f"the engine stopped: {self.engine_error}",
                                              "type": "server_error", "param": None, "code": None}})
                        return
                    for c in list(pending):
                        if c.request.done.is_set():
                            yield _sse(chunk([piece(c, c.final_delta(), True)]))
                            pending.remove(c)
                        else:
                            with lock:
                                ids = list(c.ids)
                            text = c.delta(self.tokenizer, ids)
                            if text:
                                yield _sse(chunk([piece(c, text, False)]))
                prompt_tokens = self._prompt_tokens(choices)
                completion_tokens = self._log_done(rid, choices, prompt_tokens, started)
                if include_usage:
                    yield _sse(chunk([], usage=_usage(prompt_tokens, completion_tokens)))
                yield _sse("[DONE]")
            finally:  # also when the client disconnects: starlette cancels this generator
                self._cancel(rid, choices, started, "stream closed early")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _include_usage(body: _Common) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(path, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16, max_len: int | None = None,
          step: int | None = None, served_model_name: str | None = None, warmup: bool = True,
          stats_every: float = 10.0) -> int:
    """`k2jax serve`: load a run (or an exported Hugging Face directory), then serve it until interrupted.

    The port is bound first (a port in use fails before the model loads); port 0 picks a free one. The URL
    is printed on stdout once the server accepts connections.
    """
    import socket

    from k2jax.generate import load

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen there: {e.strerror}", f"{host}:{port}") from None
    port = sock.getsockname()[1]
    loaded = load(path, step)
    engine = loaded.engine(max_batch=max_batch, **({} if max_len is None else {"max_len": max_len}))
    name = served_model_name or loaded.name
    log.info("model %s (step %s): engine max_batch %d, max_len %d", name, loaded.step, engine.max_batch,
             engine.max_len)
    if warmup:  # compiles the prefill and every decode span before the first client waits for them
        started = time.monotonic()
        programs = engine.warm_up()
        log.info("warm-up: a prefill and %d decode programs compiled in %.1f s", programs, time.monotonic() - started)
    server = OpenAIServer(engine, loaded.tokenizer, name, stats_every=stats_every)
    config = uvicorn.Config(server.app, log_config=None, access_log=False, timeout_graceful_shutdown=5)
    uv = _Uvicorn(config)

    async def main() -> str | None:
        stopped_by = []

        def stop(sig: signal.Signals) -> None:  # a second one: stop without waiting for open connections
            stopped_by.append(sig.name)
            uv.force_exit = uv.should_exit
            uv.should_exit = True

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        task = asyncio.create_task(uv.serve(sockets=[sock]))
        while not uv.started and not task.done():
            await asyncio.sleep(0.05)
        if not uv.started:
            await task
            if stopped_by:
                return stopped_by[0]
            raise RuntimeError("the HTTP server did not start (its log above says why)")
        url = _url(host, port)
        print(f"k2jax serve: {name} at {url}/v1 (OpenAI API; {url}/health, {url}/stats)", flush=True)
        await task
        return stopped_by[0] if stopped_by else None

    try:
        stopped_by = asyncio.run(main())
    finally:
        server.stop_engine()
        sock.close()
    log.info("stopped%s", f" by {stopped_by}" if stopped_by else "")
    return 0


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # serve() handles SIGINT and SIGTERM: a clean shutdown, exit status 0
        yield
