"""experiments/bios: the bioS people generator, the stand-in rephraser server (through the `openai` client
and the real `k2jax rephrase`) and the sentence shuffle."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import openai
import pytest

from k2jax.rephrase.fidelity import FactsCheck
from k2jax.rephrase.prompts import load_styles

ROOT = Path(__file__).parents[1]
BIOS = ROOT / "experiments" / "bios"
sys.path.insert(0, str(BIOS))
import experiment  # noqa: E402
import people as bios  # noqa: E402
import shuffle  # noqa: E402

MODEL = "bios-paraphraser"
FILES = ("people.jsonl", "bios_raw.jsonl", "qa_train.jsonl", "qa_trainpeople.jsonl", "qa_heldout.jsonl")


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bios")
    bios.main(["--people", "200", "--seed", "3", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def server(data):
    """start(drop_rate) -> the base URL of a paraphraser subprocess on a free port; all stopped at the end."""
    procs = []

    def start(drop_rate: float) -> str:
        proc = subprocess.Popen([sys.executable, str(BIOS / "paraphraser.py"), "--people", str(data / "people.jsonl"),
                                 "--port", "0", "--model", MODEL, "--drop-rate", str(drop_rate)],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline()
        assert proc.poll() is None, "the paraphraser did not start"
        return re.search(r"http://\S+/v1", line).group()

    yield start
    for proc in procs:
        proc.terminate()  # uvicorn shuts down, then ends by the signal
        proc.wait(timeout=10)
        proc.stdout.close()


def holds(person: dict, text: str) -> list[str]:
    """The attributes whose values `text` holds."""
    return [a for a in bios.ATTRIBUTES if person[a] in text]


def test_generation_is_deterministic(data, tmp_path):
    bios.main(["--people", "200", "--seed", "3", "--out", str(tmp_path / "same")])
    bios.main(["--people", "200", "--seed", "4", "--out", str(tmp_path / "other")])
    for name in FILES:
        assert (tmp_path / "same" / name).read_bytes() == (data / name).read_bytes(), name
    assert (tmp_path / "other" / "people.jsonl").read_bytes() != (data / "people.jsonl").read_bytes()


def test_people_and_bios(data):
    people, raw = read(data / "people.jsonl"), read(data / "bios_raw.jsonl")
    assert len({p["name"] for p in people}) == len(people) == 200
    assert [p["split"] for p in people].count("heldout") == 100
    assert [r["id"] for r in raw] == [p["id"] for p in people]
    for p, r in zip(people, raw):
        assert p["work_city"] == bios.COMPANY_CITY[p["employer"]] and p["birth_city"][-2:] != p["work_city"][-2:]
        sentences = shuffle.sentences(r["text"])
        assert len(sentences) == 6 and sentences[0].count(p["name"]) == 1
        for attribute, sentence in zip(bios.ATTRIBUTES, sentences):
            assert holds(p, sentence) == [attribute], (sentence, p)


def test_qa(data):
    people = {p["id"]: p for p in read(data / "people.jsonl")}
    train = {r["id"]: r["text"] for r in read(data / "qa_train.jsonl")}
    assert sorted(train) == sorted(f"qa-{i}/{a}" for i, p in people.items() if p["split"] == "train"
                                   for a in bios.ATTRIBUTES)
    for name, split in (("qa_trainpeople.jsonl", "train"), ("qa_heldout.jsonl", "heldout")):
        items = read(data / name)
        assert len(items) == 6 * 100
        for item in items:
            pid, attribute = item["id"].split("/")
            person = people[pid]
            assert person["split"] == split and item["answers"] == [person[attribute]]
            assert item["prompt"] == f"Question: {item['question']}\nAnswer:" and person["name"] in item["question"]
            if split == "train":  # the training text holds the prompt, then the answer
                assert train[f"qa-{pid}/{attribute}"] == f"{item['prompt']} {person[attribute]}."


def test_pools_share_no_word():
    pools = [bios.MALE + bios.FEMALE, bios.MIDDLE, bios.LAST, bios.CITIES, bios.UNIVERSITIES, bios.MAJORS,
             bios.COMPANIES]
    words = [{w.strip(",") for value in pool for w in value.split()} for pool in pools]
    assert sum(map(len, words)) == len(set().union(*words))


def test_a_left_out_sentence_fails_the_facts_check(data):
    check = FactsCheck()
    for person, raw in zip(read(data / "people.jsonl"), read(data / "bios_raw.jsonl")):
        choices = bios.draw_choices(random.Random(person["id"]))
        assert check.score(raw["text"], bios.render(person, choices)) == 1.0
        for attribute in bios.ATTRIBUTES:
            kept = [a for a in bios.ATTRIBUTES if a != attribute]
            assert check.score(raw["text"], bios.render(person, choices, kept)) < check.threshold


def test_paraphraser_through_openai(data, server):
    people, raw = read(data / "people.jsonl"), read(data / "bios_raw.jsonl")
    client = openai.OpenAI(base_url=server(0.0), api_key="none", max_retries=0)
    dropping = openai.OpenAI(base_url=server(1.0), api_key="none", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    styles = load_styles("knowledge")
    for person, bio, style in zip(people, raw, styles):
        prompt = style.render("", bio["text"])
        replies = []
        for seed in range(3):
            reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                   seed=seed, max_tokens=600)
            text = reply.choices[0].message.content
            assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == len(text.split())
            assert person["name"] in shuffle.sentences(text)[0]
            assert holds(person, text) == list(bios.ATTRIBUTES)
            replies.append(text)
        assert len(set(replies)) > 1 and any(r != bio["text"] for r in replies)
        completion = client.completions.create(model=MODEL, prompt=prompt, seed=0, max_tokens=600)
        assert completion.choices[0].text == replies[0]  # chat and completions rewrite alike
        dropped = dropping.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], seed=0)
        assert len(holds(person, dropped.choices[0].message.content)) == 5
    unknown = "Rewrite this.\n\nPassage:\nNobody we know was born on May 1, 1990.\n\nRewritten passage:\n"
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": unknown}])
    assert reply.choices[0].message.content == "Nobody we know was born on May 1, 1990."
    cut = client.completions.create(model=MODEL, prompt=styles[0].render("", raw[0]["text"]), max_tokens=5)
    assert cut.choices[0].finish_reason == "length" and len(cut.choices[0].text.split()) == 5
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_k2jax_rephrase_through_the_paraphraser(data, server, tmp_path):
    people = read(data / "people.jsonl")[:10]
    source = tmp_path / "bios.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in read(data / "bios_raw.jsonl")[:10]))
    out = tmp_path / "rephrased"
    result = subprocess.run([str(Path(sys.executable).parent / "k2jax"), "rephrase", str(source), "--out", str(out),
                             "--base-url", server(0.25), "--model", MODEL, "--rephrasings", "3", "--retries", "5",
                             "--concurrency", "4"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    records = [r for part in sorted(out.glob("part-*.jsonl")) for r in read(part)]
    assert sorted(r["id"] for r in records) == sorted(f"bios.jsonl:{i}#{k}" for i in range(10) for k in range(3))
    for record in records:
        person = people[int(record["source_id"].split(":")[1])]
        assert holds(person, record["text"]) == list(bios.ATTRIBUTES)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rewrites"] == 30 and summary["dropped"] == 0
    assert summary["chunk_retries"] == summary["chunk_failures"]["unfaithful"] > 0  # the left-out sentences


def test_shuffle(data, tmp_path):
    out = tmp_path / "shuffled.jsonl"
    shuffle.main([str(data / "bios_raw.jsonl"), str(out), "--seed", "1"])
    raw, shuffled = read(data / "bios_raw.jsonl"), read(out)
    assert [r["id"] for r in shuffled] == [r["id"] for r in raw] and not out.with_name(out.name + ".tmp").exists()
    for a, b in zip(raw, shuffled):
        assert sorted(shuffle.sentences(a["text"])) == sorted(shuffle.sentences(b["text"]))
    assert sum(a["text"] != b["text"] for a, b in zip(raw, shuffled)) > 150
    shuffle.main([str(data / "bios_raw.jsonl"), str(tmp_path / "again.jsonl"), "--seed", "1"])
    assert (tmp_path / "again.jsonl").read_bytes() == out.read_bytes()


def test_the_reported_intervals_are_scipys_wilson_intervals():
    from scipy.stats import binomtest

    for hits, n in ((0, 600), (125, 600), (1119, 1200), (1200, 1200), (3, 7)):
        expected = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
        np.testing.assert_allclose(experiment.wilson(hits, n), (expected.low, expected.high), atol=2e-4)
