"""`k2jax serve` as a real process on localhost, spoken to with the official `openai` client.

One server (a tiny run trained here, the same config as tests/test_train.py's, so the train step comes
from the compilation cache) answers every check of `test_serve`; its log goes to a file the checks read.
Answers are compared with the engine's own `generate` in this process.
"""

import contextlib
import inspect
import io
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import numpy as np
import openai
import pytest

from k2jax.config import load_config
from k2jax.inference.engine import SamplingParams
from k2jax.inference.server import CHAT_STOP, chat_prompt
from k2jax.train.loop import train

ROOT = Path(__file__).parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"
MAX_LEN = 512
# the tiny run trained on 64-token rows, and chat prompts reach past that (the engine warns once)
pytestmark = pytest.mark.filterwarnings("ignore:generation reaches position")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny-run"
    with contextlib.redirect_stdout(io.StringIO()):
        train(load_config(TINY, [f"train.out_dir={out}", "train.progress=false", "train.log_every=1",
                                 "checkpoint.async_save=false"]))
    return out


@pytest.fixture(scope="module")
def server(run_dir):
    """(base URL, path of the server's log) of `k2jax serve RUN_DIR --port 0`; terminated afterwards."""
    log_path = run_dir.parent / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "k2jax.cli", "serve", str(run_dir), "--host", "127.0.0.1",
                                 "--port", "0", "--max-len", str(MAX_LEN)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=log, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put("")], daemon=True).start()
    try:
        try:
            line = lines.get(timeout=180)  # "" at once if the process ends
        except queue.Empty:
            line = ""
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, f"no URL printed (exit {proc.poll()}): {line!r}\n{log_path.read_text()[-3000:]}"
        url = match.group(0)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.1)
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def local(run_dir):
    """The engine over the same checkpoint, in this process: what the server must answer."""
    from k2jax.generate import load

    return load(run_dir).engine(max_len=MAX_LEN)


def _stats(url) -> dict:
    return httpx.get(f"{url}/stats", timeout=10).json()


def _greedy(engine, prompts, max_tokens, **kw):
    return engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw))


def check_models_health_and_stats(server, client, run_dir):
    url, _ = server
    assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [run_dir.name]
    stats = _stats(url)
    assert {"requests", "prefill_batches", "decode_calls", "max_active", "active", "waiting"} <= set(stats)


def check_greedy_completions_equal_generate(client, local, run_dir):
    prompts = ["def ", "import os\n"]
    expected = _greedy(local, prompts, 24)
    one = client.completions.create(model=run_dir.name, prompt=prompts[0], max_tokens=24, temperature=0)
    assert one.object == "text_completion" and one.model == run_dir.name and one.id.startswith("cmpl-")
    assert [c.text for c in one.choices] == [expected[0].text]
    assert one.choices[0].finish_reason == ("length" if expected[0].finish_reason == "length" else "stop")
    assert one.usage.prompt_tokens == len(expected[0].prompt_ids)
    assert one.usage.completion_tokens == len(expected[0].token_ids)
    both = client.completions.create(model=run_dir.name, prompt=prompts, max_tokens=24, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [e.text for e in expected]
    assert both.usage.prompt_tokens == sum(len(e.prompt_ids) for e in expected)


def check_chat_uses_the_template_and_stops_at_a_role_tag(client, local, run_dir):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop, please."}]
    prompt = chat_prompt(messages)
    assert prompt == "<|system|>\nYou write Python.\n<|user|>\nA loop, please.\n<|assistant|>\n"
    [expected] = _greedy(local, [prompt], 20, stop=CHAT_STOP)
    reply = client.chat.completions.create(model=run_dir.name, messages=messages, max_tokens=20, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    [choice] = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert reply.usage.prompt_tokens == len(expected.prompt_ids)
    assert reply.usage.completion_tokens == len(expected.token_ids)
    # max_completion_tokens is max_tokens' newer name
    again = client.chat.completions.create(model=run_dir.name, messages=messages, max_completion_tokens=20,
                                           temperature=0)
    assert again.choices[0].message.content == expected.text


def check_n_choices_are_distinct_and_seeded(client, local, run_dir):
    kw = dict(model=run_dir.name, prompt="def ", max_tokens=16, temperature=1.0, n=3, seed=1234,
              extra_body={"ignore_eos": True})
    first = client.completions.create(**kw)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) == 3, texts
    assert first.usage.completion_tokens == 3 * 16 and first.usage.prompt_tokens == len("def ") + 1  # bos
    assert [c.text for c in client.completions.create(**kw).choices] == texts  # the same seed, the same text
    # choice j draws with seed + j, whatever else shares its batch
    assert texts == [local.generate(["def "], SamplingParams(max_tokens=16, temperature=1.0, seed=1234 + j,
                                                             ignore_eos=True))[0].text for j in range(3)]
    chat = client.chat.completions.create(model=run_dir.name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=12, n=2, seed=7, temperature=1.0)
    assert [c.index for c in chat.choices] == [0, 1]


def check_stop_strings_end_the_text_before_them(client, run_dir):
    kw = dict(model=run_dir.name, prompt="class ", max_tokens=24, temperature=1.0, seed=5,
              extra_body={"ignore_eos": True})
    base = client.completions.create(**kw).choices[0]
    assert base.finish_reason == "length" and len(base.text) >= 10, base
    stop = base.text[6:9]  # seeded: the same draws up to the stop string
    cut = client.completions.create(stop=[stop, "\x00never"], **kw).choices[0]
    assert cut.text == base.text[:base.text.find(stop)] and cut.finish_reason == "stop", (base.text, stop, cut)
    assert client.completions.create(stop=stop, **kw).choices[0].text == cut.text  # one string, not a list


def check_logprobs(client, local, run_dir):
    [expected] = _greedy(local, ["def "], 8, logprobs=3, ignore_eos=True)
    choice = client.completions.create(model=run_dir.name, prompt="def ", max_tokens=8, temperature=0, logprobs=3,
                                       extra_body={"ignore_eos": True}).choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert lp.tokens == expected.tokens
    np.testing.assert_allclose(lp.token_logprobs, expected.logprobs, atol=1e-3)
    assert lp.text_offset[0] == len("def ") and lp.text_offset == sorted(lp.text_offset)
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4 and top[token] == pytest.approx(chosen)
        assert chosen <= 0 and max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy: the argmax
    chat = client.chat.completions.create(model=run_dir.name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    # (alternatives are keyed by their text: two byte tokens that both decode to U+FFFD would be one entry)
    assert all(1 <= len(t.top_logprobs) <= 2 and t.logprob <= 0 for t in content)


def check_streaming_assembles_to_the_same_text(client, run_dir):
    kw = dict(model=run_dir.name, prompt="def ", max_tokens=40, temperature=0, stop=["):"])
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, **kw))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    messages = [{"role": "user", "content": "Say something."}]
    reply = client.chat.completions.create(model=run_dir.name, messages=messages, max_tokens=30, temperature=0)
    stream = list(client.chat.completions.create(model=run_dir.name, messages=messages, max_tokens=30,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == reply.usage.completion_tokens


def check_concurrent_requests_share_device_batches(server, client, local, run_dir):
    url, _ = server
    kw = dict(model=run_dir.name, max_tokens=32, temperature=0, extra_body={"ignore_eos": True})
    before = _stats(url)
    client.completions.create(prompt="solo", **kw)
    solo = {k: _stats(url)[k] - before[k] for k in ("prefill_batches", "decode_calls")}
    prompts = [f"# request {i}\n" for i in range(16)]
    answers, errors = [None] * 16, []
    barrier = threading.Barrier(16)

    def ask(i):
        try:
            barrier.wait(timeout=30)
            answers[i] = client.completions.create(prompt=prompts[i], **kw).choices[0].text
        except Exception as e:  # reported below
            errors.append(e)

    before = _stats(url)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    after = _stats(url)
    assert not errors, errors
    assert answers == [c.text for c in _greedy(local, prompts, 32, ignore_eos=True)]
    grew = {k: after[k] - before[k] for k in ("requests", "prefill_batches", "decode_calls")}
    # alone, each request would have needed solo[...] device calls; batched, the 16 share them
    assert grew["requests"] == 16
    assert grew["decode_calls"] <= 16 * solo["decode_calls"] // 2, (grew, solo)
    assert grew["prefill_batches"] <= 16 * solo["prefill_batches"] // 2, (grew, solo)
    assert after["max_active"] > 1 and after["active"] == 0


def check_malformed_requests_get_400_with_an_openai_error(server, client, run_dir):
    url, _ = server
    name = run_dir.name
    cases = [  # (call, param of the error)
        (lambda: client.completions.create(model=name, prompt="x", temperature=5), "temperature"),
        (lambda: client.completions.create(model=name, prompt="x", max_tokens="5"), "max_tokens"),
        (lambda: client.completions.create(model=name, prompt="x", max_tokens=0), "max_tokens"),
        (lambda: client.completions.create(model=name, prompt="x", n=0), "n"),
        (lambda: client.completions.create(model=name, prompt="x", logprobs=6), "logprobs"),
        (lambda: client.completions.create(model=name, prompt={"a": 1}), "prompt"),
        (lambda: client.completions.create(model=name, prompt=[]), "prompt"),
        (lambda: client.completions.create(model=name, prompt="x", stop=""), "stop"),
        (lambda: client.completions.create(model=name, prompt="x", echo=True), "echo"),
        (lambda: client.completions.create(model="no-such-model", prompt="x"), "model"),
        (lambda: client.completions.create(model=name, prompt="x", max_tokens=MAX_LEN), "max_tokens"),
        (lambda: client.completions.create(model=name, prompt="x" * (2 * MAX_LEN), max_tokens=1), "prompt"),
        (lambda: client.chat.completions.create(model=name, messages=[]), "messages"),
        (lambda: client.chat.completions.create(model=name, messages=[{"role": "wizard", "content": "x"}]),
         "messages.0.role"),
        (lambda: client.chat.completions.create(model=name, messages=[{"role": "user"}]), "messages.0.content"),
        (lambda: client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}],
                                                top_logprobs=9, logprobs=True), "top_logprobs"),
    ]
    for call, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        e = caught.value
        assert e.status_code == 400 and e.type == "invalid_request_error" and e.param == param, (param, e.body)
        assert isinstance(e.body["message"], str) and e.body["message"], e.body
    assert "context length" in _error_of(lambda: client.completions.create(model=name, prompt="x",
                                                                           max_tokens=MAX_LEN))
    for raw in (b"{not json", b"[1, 2]", b""):
        r = httpx.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    r = httpx.post(f"{url}/v1/completions", json={"model": name})  # no prompt
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert httpx.get(f"{url}/health").status_code == 200


def _error_of(call) -> str:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value.body["message"]


def check_a_dropped_client_frees_its_slot_and_the_server_lives_on(server, client, run_dir):
    url, log_path = server
    # 64 choices of ~500 tokens: four rounds of the 16 slots, seconds of work, dropped after 0.4 s
    body = {"model": run_dir.name, "prompt": "def ", "max_tokens": MAX_LEN - 8, "temperature": 1.0, "n": 64,
            "ignore_eos": True}
    outcome = []

    def long_request():
        try:
            httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.4))
            outcome.append("answered")
        except httpx.ReadTimeout:
            outcome.append("dropped")

    dropper = threading.Thread(target=long_request)
    dropper.start()
    deadline = time.monotonic() + 10
    while _stats(url)["active"] == 0 and dropper.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}  # answered during the generation
    assert time.monotonic() - started < 1.0
    dropper.join(timeout=30)
    assert outcome == ["dropped"], "the long request finished before the client dropped: make it longer"
    deadline = time.monotonic() + 20
    while (s := _stats(url))["active"] or s["waiting"]:
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    cancelled = re.search(r"cmpl-\w+: client disconnected after [\d.]+ s; cancelled (\d+) engine request",
                          log_path.read_text())
    assert cancelled and int(cancelled.group(1)) >= 48, cancelled  # the waiting ones at least
    # the same with a stream: closing it cancels the request
    with client.completions.create(model=run_dir.name, prompt="def ", max_tokens=MAX_LEN - 8, stream=True,
                                   extra_body={"ignore_eos": True}) as stream:
        next(iter(stream))
    deadline = time.monotonic() + 20
    while (s := _stats(url))["active"] or s["waiting"]:
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    assert "stream closed early" in log_path.read_text()
    again = client.completions.create(model=run_dir.name, prompt="def ", max_tokens=4, temperature=0)
    assert again.usage.completion_tokens >= 1 and _stats(url)["active"] == 0


CHECKS = [check_models_health_and_stats, check_greedy_completions_equal_generate,
          check_chat_uses_the_template_and_stops_at_a_role_tag, check_n_choices_are_distinct_and_seeded,
          check_stop_strings_end_the_text_before_them, check_logprobs, check_streaming_assembles_to_the_same_text,
          check_concurrent_requests_share_device_batches, check_malformed_requests_get_400_with_an_openai_error,
          check_a_dropped_client_frees_its_slot_and_the_server_lives_on]


def test_serve(server, client, local, run_dir, subtests):
    """Every check against one server, each a subtest reported on its own (as separate tests, pytest-xdist
    would hand them to several workers, each training a run and starting a server)."""
    given = dict(server=server, client=client, local=local, run_dir=run_dir)
    for check in CHECKS:
        with subtests.test(check.__name__.removeprefix("check_")):
            check(**{name: given[name] for name in inspect.signature(check).parameters})


def test_a_bad_run_dir_is_one_line_and_exit_3(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "k2jax.cli", "serve", str(tmp_path), "--port", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout == "", proc
    assert proc.stderr.strip() == f"k2jax serve: {tmp_path} is not a run directory (no config.yaml)"
