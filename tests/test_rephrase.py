"""`k2jax rephrase` against a real HTTP server on 127.0.0.1 that misbehaves on request.

`FakeGenerator` is a stdlib OpenAI-compatible server: it "rewrites" a chunk by echoing it
behind its style's marker (so a record's text can be checked against its source), drops
the numbers of a chunk for some seeds (so the facts check rejects it and the chunk is
retried) and always for a chunk holding ALWAYS_BAD (so its rewrite is dropped), and
answers queued faults first: 429 (with a Retry-After), 500, 400, a timeout, a reply cut
mid-body, a half JSON body. As a judge (a prompt of the judge's rubric, models "fake" and
"judge") it gives 5 of 5, and 2 to a rewrite that lost a number, after the replies queued
in `judge_replies`.
"""

import collections
import hashlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from k2jax import cli
from k2jax.rephrase import chunking
from k2jax.rephrase.client import Client, GenerationError
from k2jax.rephrase.fidelity import EmbeddingCheck, FactsCheck, JudgeCheck, Unscored, parse_grade
from k2jax.rephrase.job import Job
from k2jax.rephrase.prompts import load_styles, shipped_sets

ROOT = Path(__file__).parents[1]
STYLES = """name: test
styles:
  - name: alpha
    template: "STYLE alpha\\nPREVIOUS<<{previous}>>\\nCHUNK<<{chunk}>>"
  - name: beta
    template: "STYLE beta\\nPREVIOUS<<{previous}>>\\nCHUNK<<{chunk}>>"
"""


class FakeGenerator:
    """An OpenAI-compatible server on 127.0.0.1 in a thread; `faults` are answered first, one per POST."""

    def __init__(self, delay: float = 0.0, embeddings: bool = True):
        self.delay, self.embeddings = delay, embeddings
        self.faults: collections.deque[str] = collections.deque()
        self.judge_replies: collections.deque[str] = collections.deque()
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client killed mid-request: no traceback
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def wait_requests(self, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
        """Until n requests have come, or `proc` has ended."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < n and proc.poll() is None:
            assert time.monotonic() < deadline, f"{len(self.requests)} requests of {n} after {timeout} s"
            time.sleep(0.01)

    def judge(self, prompt: str) -> str:
        source, rewrite = re.search(r"SOURCE:\n(.*)\n\nREWRITE:\n(.*)\n\nScore:", prompt, re.S).groups()
        with self.lock:
            if self.judge_replies:
                return self.judge_replies.popleft()
        lost = set(re.findall(r"\d+", source)) - set(re.findall(r"\d+", rewrite))
        return f"**2** - the rewrite lost {sorted(lost)}" if lost else "Score: 5/5"

    @staticmethod
    def rewrite(prompt: str, seed: int) -> str:
        style = re.search(r"STYLE (\w+)", prompt).group(1)
        chunk = re.search(r"CHUNK<<(.*)>>", prompt, re.S).group(1)
        if "ALWAYS_BAD" in chunk or seed % 3 == 0:
            chunk = re.sub(r"\d", "", chunk)
        return f"[{style}] {chunk}"

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40 ms wait between the headers and the body

            def log_message(self, *args):
                pass

            def _send(self, status: int, payload, headers=()):
                body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    models = [{"id": m, "object": "model"} for m in ("fake", "judge")]
                    self._send(200, {"object": "list", "data": models})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fault = fake.faults.popleft() if fake.faults else None
                    fake.requests.append(body)
                time.sleep(fake.delay)
                if fault and fault.startswith("429"):  # "429:S" asks the client to wait S seconds
                    wait = fault.partition(":")[2] or "0"
                    return self._send(429, {"error": {"message": "slow down"}}, [("Retry-After", wait)])
                if fault == "500":
                    return self._send(500, {"error": {"message": "boom"}})
                if fault == "400":
                    return self._send(400, {"error": {"message": "prompt too long"}})
                if fault == "timeout":
                    time.sleep(1.0)
                if self.path == "/v1/embeddings" and fake.embeddings:
                    vectors = [_bag_of_words(t) for t in body["input"]]
                    payload = {"data": [{"index": i, "embedding": v} for i, v in enumerate(vectors)]}
                elif self.path in ("/v1/chat/completions", "/v1/completions"):
                    chat = self.path == "/v1/chat/completions"
                    prompt = body["messages"][0]["content"] if chat else body["prompt"]
                    text = fake.judge(prompt) if "REWRITE:" in prompt else fake.rewrite(prompt, body["seed"])
                    choice = {"index": 0, "finish_reason": "stop",
                              **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
                    payload = {"choices": [choice], "usage": {"completion_tokens": len(text.split())}}
                else:
                    return self._send(404, {"error": {"message": f"no {self.path}"}})
                full = json.dumps(payload).encode()
                if fault == "bad_json":
                    return self._send(200, full[: len(full) // 2])
                if fault == "half":  # promise the whole body, send half of it, hang up
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(full)))
                    self.end_headers()
                    self.wfile.write(full[: len(full) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                try:
                    self._send(200, full)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout fault)
                    pass

        return Handler


def _bag_of_words(text: str, dim: int = 64) -> list[float]:
    v = [0.0] * dim
    for word in re.findall(r"\w+", text.lower()):
        v[int(hashlib.md5(word.encode()).hexdigest(), 16) % dim] += 1.0
    return v


@pytest.fixture
def fake():
    server = FakeGenerator()
    yield server
    server.close()


def _corpus(path: Path, n: int = 6, seed: int = 0) -> Path:
    """n documents of numbered, named facts in paragraphs; document 3 holds ALWAYS_BAD."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for d in range(n):
            paragraphs = []
            for p in range(rng.randint(1, 3)):
                sentences = [f"Person{d} Smith{p} was born in {1900 + rng.randint(0, 99)} in Town{rng.randint(0, 9)}."
                             for _ in range(rng.randint(1, 3))]
                paragraphs.append(" ".join(sentences + (["ALWAYS_BAD 7 times."] if d == 3 and p == 0 else [])))
            f.write(json.dumps({"text": "\n\n".join(paragraphs)}) + "\n")
    return path


def _records(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    records = []
    for part in manifest["parts"]:
        path = out / part["file"]
        if path.suffix == ".parquet":
            records += pq.read_table(path).to_pylist()
        else:
            records += [json.loads(line) for line in path.read_text().splitlines()]
    return records


def _outcome_ids(out: Path) -> list[str]:
    """Every id the output holds: its records' and those dropped, repeats kept."""
    manifest = json.loads((out / "manifest.json").read_text())
    return [r["id"] for r in _records(out)] + [i for part in manifest["parts"] for i in part["dropped"]]


def _normal(text: str) -> str:
    return " ".join(text.split())


# ---- chunking ----

def _document(rng: random.Random) -> str:
    def sentence():
        n = rng.choice([1, 2, 4, 8, 40])  # some sentences longer than the smaller T
        return " ".join(rng.choice(["alpha", "b", "gamma-delta", "x" * rng.randint(1, 30)]) for _ in range(n)) + \
            rng.choice([".", "!", "?", '."'])
    paragraphs = [(" " * rng.randint(1, 2)).join(sentence() for _ in range(rng.randint(1, 5)))
                  for _ in range(rng.randint(1, 6))]
    return rng.choice(["", "  "]) + rng.choice(["\n\n", "\n \n", "\n\n\n"]).join(paragraphs) + rng.choice(["", "\n"])


@pytest.mark.parametrize("count", [chunking.estimate_tokens, lambda t: len(t.encode())], ids=["estimate", "bytes"])
def test_chunks_rebuild_the_document_fit_t_and_cut_sentences_only_when_too_long(count):
    rng = random.Random(0)
    for _ in range(60):
        text = _document(rng)
        sentence_ends = set(chunking._boundaries(chunking._PARAGRAPH, text) +
                            chunking._boundaries(chunking._SENTENCE, text))
        for t in (5, 17, 60):
            chunks = chunking.chunk_text(text, t, count)
            assert "".join(chunks) == text
            assert all(count(c) <= t for c in chunks)
            end = 0
            for c in chunks:
                end += len(c)
                if end not in sentence_ends:  # cut inside a sentence: that sentence alone is longer than t
                    start = max([0, *(e for e in sentence_ends if e < end)])
                    stop = min(e for e in sentence_ends if e > end)
                    assert count(text[start:stop]) > t, (text[start:stop], t)


def test_chunks_prefer_paragraph_boundaries():
    text = ("One short paragraph.\n\nTwo. Sentences here.\n\n"
            "A third paragraph, of two sentences. Its second sentence is much longer than any chunk.")
    assert chunking.chunk_text(text, 12) == ["One short paragraph.\n\nTwo. Sentences here.\n\n",
                                             "A third paragraph, of two sentences. ",
                                             "Its second sentence is much longer than any ", "chunk."]
    assert chunking.chunk_text(text, 100) == [text]


def test_chunking_a_long_document_counts_each_part_a_few_times_only():
    text = "Ada Lovelace was born in 1815 in London. She worked with Charles Babbage. " * 3000  # one paragraph
    counted = []
    chunks = chunking.chunk_text(text, 300, lambda t: counted.append(len(t)) or chunking.estimate_tokens(t))
    assert "".join(chunks) == text and len(chunks) > 100
    assert sum(counted) < 40 * len(text)  # not the rest of the document per chunk (that is ~len(chunks) / 2)


# ---- prompts and fidelity ----

def test_shipped_prompt_sets_load_and_bad_sets_are_refused(tmp_path):
    assert {"knowledge", "math"} <= set(shipped_sets()) and "judge" not in shipped_sets()  # the rubric is no set
    styles = load_styles("knowledge")
    assert len(styles) >= 4 and all("{chunk}" in s.template for s in styles)
    assert len({s.prompt_hash for s in styles}) == len(styles)
    bad = tmp_path / "bad.yaml"
    for text, message in (("styles: []", "no styles"), ("styles: [{name: a, template: '{chunk}'}]", "exactly"),
                          ("styles: [{name: a, template: '{chunk} {previous} {'}]", "brace"),
                          ("nope: 1", "not a prompt set")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_styles(str(bad))


def test_facts_check_counts_numbers_and_names():
    source = "The Eiffel Tower in Paris was finished in 1889. It is 330 m tall; NASA measured 1,000 visitors."
    check = FactsCheck()
    assert check.score(source, source) == 1.0
    assert check.score(source, "In 1889 Paris got the Eiffel Tower, 330 m high; NASA counted 1000 visitors.") == 1.0
    assert check.score(source, "A tall tower in a city.") == 0.0
    assert 0.5 < check.score(source, "The Eiffel Tower in Paris, 330 m, counted 1000 by NASA.") < check.threshold
    assert check.score("no facts here.", "anything") == 1.0


def test_judge_scores_parse_the_first_grade_from_1_to_5():
    for reply, grade in (("5", 5), ("Score: 4/5", 4), ("**2** - it lost 1889", 2), ("I'd say 3 out of 5.", 3),
                         ("10 facts; grade 4", 4), ("2.5, so 3", 3), (" 1\n", 1)):
        assert parse_grade(reply) == grade, reply
    for reply in ("", "Faithful.", "0/5", "Score: 0", "7"):
        with pytest.raises(Unscored):
            parse_grade(reply)


def test_embedding_check_uses_the_server(fake):
    with Client(fake.url, "fake", retries=0) as client:
        check = EmbeddingCheck(client)
        assert check.score("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
        assert check.score("the cat sat on the mat", "quantum fields of stars") < check.threshold


# ---- the client ----

def test_client_retries_every_kind_of_failure_and_counts_it(fake):
    fake.faults.extend(["429", "500", "timeout", "half", "bad_json"])
    with Client(fake.url, "fake", timeout=0.5, retries=5, backoff=0.01) as client:
        reply = client.generate("STYLE a\nPREVIOUS<<>>\nCHUNK<<Ada 1815.>>", max_tokens=16, seed=1)
        assert reply.text == "[a] Ada 1815." and reply.finish_reason == "stop"
        assert client.failures == {"rate_limited": 1, "server_error": 1, "timeout": 1, "incomplete": 1,
                                   "malformed": 1}
        assert client.requests == 6
        fake.faults.append("429:0.3")
        started = time.monotonic()
        client.generate("STYLE a\nPREVIOUS<<>>\nCHUNK<<z>>", max_tokens=16, seed=1)
        assert time.monotonic() - started >= 0.3 and client.failures["rate_limited"] == 2  # Retry-After kept

    fake.faults.extend(["500"] * 3)  # more failures than tries: an error, never a reply
    with Client(fake.url, "fake", endpoint="completions", retries=2, backoff=0.01) as client:
        with pytest.raises(GenerationError, match="3 tries failed") as e:
            client.generate("STYLE a\nPREVIOUS<<>>\nCHUNK<<x>>", max_tokens=16, seed=1)
        assert e.value.kind == "server_error" and client.failures == {"server_error": 3}
        fake.faults.append("400")  # refused: not worth retrying
        with pytest.raises(GenerationError) as e:
            client.generate("STYLE a\nPREVIOUS<<>>\nCHUNK<<x>>", max_tokens=16, seed=1)
        assert e.value.kind == "rejected" and client.requests == 4
        assert client.generate("STYLE a\nPREVIOUS<<>>\nCHUNK<<y>>", max_tokens=16, seed=1).text == "[a] y"


# ---- the job ----

def test_job_rewrites_chunk_by_chunk_checks_facts_and_drops_what_keeps_failing(fake, tmp_path):
    source = _corpus(tmp_path / "docs.jsonl")
    (tmp_path / "styles.yaml").write_text(STYLES)
    fake.faults.extend(["429", "500", "half"])
    with Client(fake.url, "fake", retries=3, backoff=0.01) as client:
        summary = Job(str(source), tmp_path / "out", client, load_styles(str(tmp_path / "styles.yaml")),
                      rephrasings=2, concurrency=3, chunk_tokens=12, retries=3, shard_records=4).run()
    docs = [json.loads(line)["text"] for line in source.read_text().splitlines()]
    records = {r["id"]: r for r in _records(tmp_path / "out")}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    dropped = {i: why for part in manifest["parts"] for i, why in part["dropped"].items()}
    assert set(dropped) == {"docs.jsonl:3#0", "docs.jsonl:3#1"}
    assert sorted([*records, *dropped]) == sorted(f"docs.jsonl:{d}#{r}" for d in range(6) for r in range(2))
    assert summary["documents"] == 6 and summary["rewrites"] == 10 and summary["dropped"] == 2
    assert summary["request_failures"] == {"incomplete": 1, "rate_limited": 1, "server_error": 1}
    assert summary["chunk_failures"]["unfaithful"] == summary["chunk_retries"] + 2 > 2  # seed % 3 == 0 fails
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    prompts = {q["seed"]: q["messages"][0]["content"] for q in fake.requests}
    for r in records.values():
        d = int(r["source_id"].split(":")[1])
        assert r["style"] in ("alpha", "beta") and r["model"] == "fake" and len(r["prompt_hash"]) == 16
        assert {x["style"] for x in records.values() if x["source_id"] == r["source_id"]} == {"alpha", "beta"}
        marker = f"[{r['style']}] "
        assert _normal(r["text"].replace(marker, "")) == _normal(docs[d])  # every chunk, in order
        assert all(c["fidelity"] >= 0.9 for c in r["chunks"])
        assert "".join(docs[d][c["span"][0]:c["span"][1]] for c in r["chunks"]) == docs[d]
        previous = ""
        for c in r["chunks"]:  # chunk k's request carries the rewrite of chunks < k
            prompt = prompts[c["seed"]]
            sent = re.search(r"PREVIOUS<<(.*)>>\nCHUNK", prompt, re.S).group(1)
            assert sent.endswith(previous) and (previous or sent == "")
            assert c["attempts"] == len({q["seed"] for q in fake.requests if q["messages"][0]["content"] == prompt})
            previous = marker + docs[d][c["span"][0]:c["span"][1]].strip()
    assert any(c["attempts"] > 1 for r in records.values() for c in r["chunks"])


def _cli(fake_url: str, source: Path, out: Path, styles: Path, *extra: str) -> list[str]:
    return ["rephrase", str(source), "--out", str(out), "--base-url", fake_url, "--model", "fake", "--styles",
            str(styles), "--rephrasings", "2", "--chunk-tokens", "12", "--shard-records", "3", *extra]


def _wait_for_a_commit(manifest: Path, proc, timeout: float = 60.0) -> None:
    """Until the manifest lists a part (or the job ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(manifest.read_text())["parts"]:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)


@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
def test_kill_at_random_points_then_rerun_gives_every_pair_exactly_once(fake, tmp_path, file_format):
    source = _corpus(tmp_path / "docs.jsonl", n=12, seed=1)
    styles, out = tmp_path / "styles.yaml", tmp_path / "out"
    styles.write_text(STYLES)
    fake.delay = 0.01
    argv = _cli(fake.url, source, out, styles, "--concurrency", "4", "--format", file_format)
    rng = random.Random(0)
    for launch in range(2):  # SIGKILL once some random number of requests is answered (the first: after a commit)
        proc = subprocess.Popen([sys.executable, "-m", "k2jax.cli", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            fake.wait_requests(len(fake.requests) + rng.randint(10, 40), proc)
            if launch == 0:  # on a loaded machine the requests can come before any part is committed
                _wait_for_a_commit(out / "manifest.json", proc)
            time.sleep(rng.uniform(0, 0.05))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    (out / f"part-00999.{file_format}.tmp").write_text('{"id": "half')  # as a kill inside a write leaves it
    (out / f"part-00998.{file_format}").write_text("")  # a part no manifest lists: deleted
    fake.delay = 0.0
    assert cli.main(argv) == 0
    ids = _outcome_ids(out)
    assert sorted(ids) == sorted(f"docs.jsonl:{d}#{r}" for d in range(12) for r in range(2))
    assert not list(out.glob("*.tmp"))
    listed = {p["file"] for p in json.loads((out / "manifest.json").read_text())["parts"]}
    assert {p.name for p in out.glob("part-*")} == listed and {Path(f).suffix for f in listed} == {f".{file_format}"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rewrites"] + summary["dropped"] == 24 and summary["pairs_this_launch"] < 24
    assert cli.main(argv) == 0  # a finished job: nothing to do
    assert sorted(_outcome_ids(out)) == sorted(ids)


CRASH_BETWEEN_PART_AND_MANIFEST = """
import os, sys
from k2jax import cli
from k2jax.rephrase import job
write, seen = job._atomic_write, []
def crashing_write(path, text):
    if path.name == "manifest.json" and len(seen) == 1:
        os._exit(9)  # the part of this commit is written, its manifest never is
    seen.append(path.name) if path.name == "manifest.json" else None
    write(path, text)
job._atomic_write = crashing_write
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
def test_crash_between_part_and_manifest_is_undone_on_rerun(fake, tmp_path, file_format):
    source = _corpus(tmp_path / "docs.jsonl", n=8, seed=2)
    styles, out = tmp_path / "styles.yaml", tmp_path / "out"
    styles.write_text(STYLES)
    argv = _cli(fake.url, source, out, styles, "--concurrency", "1", "--format", file_format)
    proc = subprocess.run([sys.executable, "-c", CRASH_BETWEEN_PART_AND_MANIFEST, *argv], cwd=ROOT, timeout=120)
    assert proc.returncode == 9
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["file"] for p in manifest["parts"]] == [f"part-00000.{file_format}"]
    assert (out / f"part-00001.{file_format}").is_file()  # written, never committed
    assert cli.main(argv) == 0
    assert sorted(_outcome_ids(out)) == sorted(f"docs.jsonl:{d}#{r}" for d in range(8) for r in range(2))
    assert not list(out.glob("*.tmp"))


def test_a_server_that_goes_down_stops_the_job_keeping_its_work(fake, tmp_path, capsys):
    source = _corpus(tmp_path / "docs.jsonl", n=8, seed=4)
    styles, out = tmp_path / "styles.yaml", tmp_path / "out"
    styles.write_text(STYLES)
    fake.faults.extend(["ok"] * 30 + ["500"] * 1000)
    argv = _cli(fake.url, source, out, styles, "--concurrency", "2", "--request-retries", "1")
    assert cli.main(argv) == 6
    err = capsys.readouterr().err.strip()
    assert "2 tries failed, the last: server_error" in err and "run the same command again" in err
    assert "\n" not in err
    kept = _outcome_ids(out)
    assert 0 < len(kept) < 16
    fake.faults.clear()
    assert cli.main(argv) == 0
    assert sorted(_outcome_ids(out)) == sorted(f"docs.jsonl:{d}#{r}" for d in range(8) for r in range(2))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["request_failures"]["server_error"] >= 2


def test_embedding_fidelity_end_to_end(fake, tmp_path):
    source = _corpus(tmp_path / "docs.jsonl", n=3, seed=5)
    styles, out = tmp_path / "styles.yaml", tmp_path / "out"
    styles.write_text(STYLES)
    assert cli.main(_cli(fake.url, source, out, styles, "--fidelity", "embedding", "--min-fidelity", "0.8")) == 0
    records = _records(out)
    assert records and all(r["fidelity_check"] == "embedding" for r in records)
    assert all(0.8 <= c["fidelity"] <= 1.0 for r in records for c in r["chunks"])
    assert sum("input" in q for q in fake.requests) >= sum(len(r["chunks"]) for r in records)


def test_judge_rejects_a_rewrite_that_lost_facts_and_the_chunk_is_retried(fake, tmp_path):
    source = _corpus(tmp_path / "docs.jsonl", n=4, seed=6)
    styles, out = tmp_path / "styles.yaml", tmp_path / "out"
    styles.write_text(STYLES)
    fake.faults.extend(["ok", "429"])  # one at a time: the 2nd request is the first judge's, retried
    fake.judge_replies.append("The rewrite reads well.")  # no score: that chunk fails the check
    argv = _cli(fake.url, source, out, styles, "--fidelity", "judge", "--judge-model", "judge", "--concurrency", "1")
    assert cli.main([*argv, "--request-retries", "2", "--retries", "5"]) == 0
    docs = [json.loads(line)["text"] for line in source.read_text().splitlines()]
    records = _records(out)
    assert sorted(r["id"] for r in records) == sorted(f"docs.jsonl:{d}#{r}" for d in (0, 1, 2) for r in (0, 1))
    assert all(r["fidelity_check"] == "judge" and c["fidelity"] == 1.0 for r in records for c in r["chunks"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dropped"] == 2 and summary["request_failures"] == {"rate_limited": 1}
    assert summary["chunk_failures"]["unscored"] == 1 and summary["chunk_failures"]["unfaithful"] > 2
    assert any(c["attempts"] > 1 for r in records for c in r["chunks"])
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert settings["fidelity"] == "judge" and settings["min_fidelity"] == 0.75 and settings["judge_model"] == "judge"
    judged = [q for q in fake.requests if q["model"] == "judge"]
    assert judged and all(q["temperature"] == 0 and "seed" not in q for q in judged)
    assert all(q["model"] == "fake" for q in fake.requests if "STYLE" in q["messages"][0]["content"])
    prompts = {q["messages"][0]["content"] for q in judged}
    with Client(fake.url, "fake") as client:
        rubric = JudgeCheck(client).rubric
    for r in records:  # each accepted chunk was judged on its source and its rewrite
        for c in r["chunks"]:
            chunk = docs[int(r["source_id"].split(":")[1])][slice(*c["span"])].strip()
            assert rubric.format(source=chunk, rewrite=f"[{r['style']}] {chunk}") in prompts
    assert any(re.search(r"\d", q.split("REWRITE:")[0]) and not re.search(r"\d", q.split("REWRITE:")[1])
               for q in prompts)  # a rewrite without the numbers was judged (and rejected)


def test_parquet_parts_hold_the_jsonl_records_prepare_reads_them_and_a_format_change_is_refused(
        fake, tmp_path, capsys):
    source = _corpus(tmp_path / "docs.jsonl", n=6, seed=7)
    styles = tmp_path / "styles.yaml"
    styles.write_text(STYLES)
    for file_format in ("jsonl", "parquet"):  # a part per pair: the dropped pairs' parts hold no records
        argv = _cli(fake.url, source, tmp_path / file_format, styles, "--format", file_format, "--shard-records", "1",
                    "--concurrency", "1")
        assert cli.main(argv) == 0
    parquet = tmp_path / "parquet"
    assert sorted(p.name for p in parquet.glob("part-*")) == [f"part-{i:05d}.parquet" for i in range(12)]
    assert sorted(pq.read_table(p).num_rows for p in parquet.glob("part-*")) == [0, 0] + [1] * 10
    by_id = lambda records: sorted(records, key=lambda r: r["id"])  # noqa: E731
    assert by_id(_records(parquet)) == by_id(_records(tmp_path / "jsonl")) and len(_records(parquet)) == 10
    capsys.readouterr()
    assert cli.main(_cli(fake.url, source, parquet, styles, "--format", "jsonl")) == 2
    assert "format: 'parquet' there, 'jsonl' now" in capsys.readouterr().err
    shutil.copy(parquet / "part-00000.parquet", parquet / "part-00012.parquet")  # uncommitted, as a kill leaves it
    assert cli.main(["prepare", str(parquet), "--out", str(tmp_path / "prepared")]) == 0
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert sum(split["documents"] for split in manifest["splits"].values()) == 10  # committed parts only
    assert manifest["provenance"][str(parquet)][0]["settings"]["format"] == "parquet"


def test_shards_of_workers_together_hold_every_pair_once(fake, tmp_path):
    source = _corpus(tmp_path / "docs.jsonl", n=10, seed=3)
    styles, out = tmp_path / "styles.yaml", tmp_path / "out"
    styles.write_text(STYLES)
    for i in range(3):
        assert cli.main(_cli(fake.url, source, out, styles, "--shard", f"{i}/3")) == 0
    ids = []
    for i in range(3):
        manifest = json.loads((out / f"w{i:03d}of003-manifest.json").read_text())
        for part in manifest["parts"]:
            ids += [json.loads(line)["id"] for line in (out / part["file"]).read_text().splitlines()]
            ids += list(part["dropped"])
    assert sorted(ids) == sorted(f"docs.jsonl:{d}#{r}" for d in range(10) for r in range(2))


def test_bad_inputs_are_one_line_errors_before_any_work(fake, tmp_path, capsys):
    source = _corpus(tmp_path / "docs.jsonl", n=2)
    styles, out = tmp_path / "styles.yaml", tmp_path / "out"
    styles.write_text(STYLES)
    down = "http://127.0.0.1:9/v1"  # the discard port: nothing listens
    no_embeddings = FakeGenerator(embeddings=False)
    try:
        cases = [
            (_cli(down, source, out, styles), 6, "no OpenAI-compatible server answers"),
            (_cli(fake.url, source, out, styles, "--model", "other"), 2, "serves ['fake', 'judge'], not 'other'"),
            (_cli(fake.url, source, out, styles, "--fidelity", "judge", "--judge-model", "other"), 2,
             "--judge-model: the server at"),
            (_cli(fake.url, source, out, styles, "--judge-model", "judge"), 2, "add --fidelity judge"),
            (_cli(fake.url, tmp_path / "missing", out, styles), 2, "neither 'stdlib' nor an existing file"),
            (_cli(fake.url, source, out, tmp_path / "none.yaml"), 2, "neither a shipped prompt set"),
            (_cli(fake.url, source, out, styles, "--shard", "3"), 2, "--shard must be I/N"),
            (_cli(fake.url, source, out, styles, "--shard", "3/3"), 2, "0 <= I < N"),
            (_cli(fake.url, source, out, styles, "--concurrency", "0"), 2, "--concurrency must be at least 1"),
            (_cli(no_embeddings.url, source, out, styles, "--fidelity", "embedding"), 2, "gives no embeddings"),
        ]
        for argv, code, message in cases:
            assert cli.main(argv) == code, argv
            err = capsys.readouterr().err.strip()
            assert message in err and "\n" not in err, err
            assert not out.exists(), argv
        assert cli.main(_cli(fake.url, source, out, styles)) == 0
        capsys.readouterr()
        assert cli.main(_cli(fake.url, source, out, styles, "--chunk-tokens", "50")) == 2  # other settings
        err = capsys.readouterr().err.strip()
        assert "other settings (chunk_tokens: 12 there, 50 now; max_tokens: 24 there, 100 now)" in err
        assert "\n" not in err
    finally:
        no_embeddings.close()


# ---- --local: the generator in this process ----

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run trained (with test_serve.py's config, so its train step comes from the compilation cache) on
    short sentences, so that its gibberish often ends (eos) before --max-tokens as a real model's rewrite would."""
    import contextlib
    import io

    from k2jax.config import load_config
    from k2jax.train.loop import train

    root = tmp_path_factory.mktemp("local")
    rng = random.Random(0)
    words = "the a cat dog sat ran on in house tree river old new small big red".split()
    corpus = root / "sentences.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(2, 5))) + "."}) + "\n"
                              for _ in range(3000)))
    out = root / "tiny-run"
    with contextlib.redirect_stdout(io.StringIO()):
        train(load_config(ROOT / "experiments" / "tiny.yaml", [
            f"train.out_dir={out}", f"data.corpus={corpus}", "train.progress=false", "train.log_every=1",
            "checkpoint.async_save=false"]))
    return out


@pytest.mark.filterwarnings("ignore:generation reaches position")  # the prompts are longer than its 64-token rows
def test_local_run_batches_the_concurrent_requests_and_a_seeded_rerun_is_identical(tiny_run, tmp_path, capsys):
    source = tmp_path / "docs.jsonl"  # no numbers or names: the facts check passes whatever the text
    source.write_text("".join(json.dumps({"text": f"the {w} sat by the river and looked at the water."}) + "\n"
                              for w in ("cat", "dog", "bird", "fox", "cow", "owl")))
    styles = tmp_path / "styles.yaml"
    styles.write_text(STYLES)
    outputs = []
    for out in (tmp_path / "out", tmp_path / "again"):
        assert cli.main(["rephrase", str(source), "--out", str(out), "--local", str(tiny_run), "--styles",
                         str(styles), "--rephrasings", "2", "--concurrency", "4", "--max-tokens", "16",
                         "--max-len", "256"]) == 0
        engine_line = capsys.readouterr().out.splitlines()[-1]
        batch = float(re.fullmatch(r"engine: ([\d.]+) requests per decode call on average, 4 slots", engine_line)[1])
        assert batch > 1.2, engine_line  # the job's 4 threads' requests decoded together, not one by one
        assert sorted(_outcome_ids(out)) == sorted(f"docs.jsonl:{d}#{r}" for d in range(6) for r in range(2))
        records = _records(out)
        assert len(records) >= 6 and all(r["model"] == "tiny-run" and r["text"] for r in records)
        assert json.loads((out / "manifest.json").read_text())["settings"]["model"] == "tiny-run"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["chunk_failures"].get("cut_off", 0) > 0  # cut off at --max-tokens: finish_reason "length"
        outputs.append((sorted((r["id"], r["text"], r["chunks"]) for r in records), summary["chunk_failures"]))
    assert outputs[0] == outputs[1]


def test_local_errors_are_one_line_before_any_work(fake, tmp_path, capsys):
    source = _corpus(tmp_path / "docs.jsonl", n=2)
    out, not_a_run = tmp_path / "out", tmp_path / "not-a-run"
    not_a_run.mkdir()
    base = ["rephrase", str(source), "--out", str(out)]
    cases = [
        ([*base, "--local", str(not_a_run), "--base-url", fake.url], 2, "give --base-url URL (a server) or --local"),
        (base, 2, "give --base-url URL (a server) or --local"),
        ([*base, "--base-url", fake.url], 2, "--base-url needs --model"),
        ([*base, "--base-url", fake.url, "--model", "fake", "--max-len", "64"], 2, "--max-len is for --local"),
        ([*base, "--local", str(not_a_run), "--fidelity", "embedding"], 2, "--fidelity embedding needs a server's"),
        ([*base, "--local", str(not_a_run), "--concurrency", "0"], 2, "--concurrency (the engine's slots) must be"),
        ([*base, "--local", str(not_a_run)], 3, f"{not_a_run} is not a run directory (no config.yaml)"),
    ]
    for argv, code, message in cases:
        assert cli.main(argv) == code, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
        assert not out.exists(), argv
