"""A stand-in for an LLM rephraser of bioS biographies: an OpenAI-compatible HTTP server.

`python experiments/bios/paraphraser.py --people DIR/people.jsonl --port P --model NAME [--drop-rate R]`

GET /v1/models lists NAME; POST /v1/chat/completions (the last user message is the prompt) and
POST /v1/completions take what `k2jax rephrase` sends. The source passage is the text after the
prompt's last "Passage:" line, without a closing instruction line ("Narrative:"); the whole
prompt where there is no such line. The person is the one whose full name comes first in the
passage (none: the passage comes back unchanged). The reply is a new biography of that person:
a sentence for each attribute whose value the passage holds, in bioS order, each with templates
drawn by an RNG seeded from (the request's seed, the person's id, a hash of the prompt's first
paragraph, its instruction: the style). With probability R, drawn from the same RNG, one of the
sentences is left out, as an unfaithful rewrite would. Usage counts words as tokens; a reply
longer than max_tokens words is cut there (finish_reason "length", else "stop"). Another model
name is refused with OpenAI's 404 (model_not_found), a malformed request with a 400. Port 0
picks a free port; the one line printed says where the server listens.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import socket
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import people as bios

_PASSAGE = re.compile(r"^[ \t]*passage:[ \t]*\n?", re.I | re.M)


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def source_passage(prompt: str) -> str:
    """The text after the last "Passage:" line, up to a closing "...:" instruction line."""
    markers = list(_PASSAGE.finditer(prompt))
    lines = prompt[markers[-1].end() if markers else 0:].strip().splitlines()
    if len(lines) > 1 and lines[-1].rstrip().endswith(":"):
        lines.pop()
    return "\n".join(lines).strip()


class Paraphraser:
    """Rewrites the bios of `people` (see the module docstring)."""

    def __init__(self, people: list[dict], drop_rate: float = 0.0):
        self.by_name = {p["name"]: p for p in people}
        names = sorted(self.by_name, key=len, reverse=True)  # the longer of two names that share a start
        self.names = re.compile(r"\b(?:" + "|".join(map(re.escape, names)) + r")\b")
        self.drop_rate = drop_rate

    def rewrite(self, prompt: str, seed: int | None) -> str:
        passage = source_passage(prompt)
        found = self.names.search(passage)
        person = self.by_name[found.group()] if found else None
        attributes = [a for a in bios.ATTRIBUTES if person and person[a] in passage]
        if not attributes:
            return passage
        style = hashlib.sha256(prompt.split("\n\n", 1)[0].encode()).hexdigest()[:16]
        rng = random.Random(f"{seed}/{person['id']}/{style}")
        choices = bios.draw_choices(rng)
        if rng.random() < self.drop_rate:
            attributes.remove(rng.choice(attributes))
        return bios.render(person, choices, attributes)


def _prompt(body: dict, chat: bool) -> str:
    if chat:
        messages = body.get("messages")
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"] \
            if isinstance(messages, list) else []
        if not users:
            raise APIError(400, "'messages' must be a list holding a user message", param="messages")
        content = users[-1].get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise APIError(400, "a user message's 'content' must be a string or a list of text parts",
                           param="messages")
        return content
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string", param="prompt")
    return prompt


def build_app(paraphraser: Paraphraser, model: str) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}},
                            status_code=e.status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "bios"}]}

    async def complete(request: Request, chat: bool) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if body.get("model") != model:
            raise APIError(404, f"The model '{body.get('model')}' does not exist", "model_not_found", "model")
        seed, max_tokens = body.get("seed"), body.get("max_completion_tokens") or body.get("max_tokens")
        if not (seed is None or type(seed) is int) or not (max_tokens is None or type(max_tokens) is int):
            raise APIError(400, "'seed' and 'max_tokens' must be integers")
        prompt = _prompt(body, chat)
        text, finish = paraphraser.rewrite(prompt, seed), "stop"
        if max_tokens is not None and len(text.split()) > max_tokens:
            text, finish = " ".join(text.split()[:max_tokens]), "length"
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model, "choices": [choice], "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", required=True, help="people.jsonl of people.py")
    parser.add_argument("--model", default="bios-paraphraser", help="the model name served")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: a free port")
    parser.add_argument("--drop-rate", type=float, default=0.0, help="chance that a rewrite leaves out a sentence")
    args = parser.parse_args(argv)
    if not 0 <= args.drop_rate <= 1:
        parser.error(f"--drop-rate must be in [0, 1], got {args.drop_rate}")
    people = bios.load_people(args.people)
    app = build_app(Paraphraser(people, args.drop_rate), args.model)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    port = sock.getsockname()[1]
    print(f"bios paraphraser: {args.model} ({len(people)} people, drop rate {args.drop_rate}) at "
          f"http://{args.host}:{port}/v1", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


if __name__ == "__main__":
    main()
