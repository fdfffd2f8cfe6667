"""Evaluation: bits per byte against numpy, multiple choice against a brute-force loop, QA scoring, the
`k2jax eval` command, the training loop's `eval` section, and bad input."""

import csv
import dataclasses
import json
import math
import platform
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from k2jax.cli import main
from k2jax.config import ConfigError, load_config
from k2jax.data import corpus as corpus_lib
from k2jax.eval import build_tasks, sources
from k2jax.eval.bpb import TextSet
from k2jax.eval.choice import ChoiceTask, accuracy
from k2jax.eval.qa import exact_match, normalize_answer, score_qa
from k2jax.eval.scoring import ModelParts
from k2jax.train.metrics import plot_run, read_metrics

ROOT = Path(__file__).parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"
EVAL = ["eval.bits_per_byte=[heldout]", "eval.tasks=[stdlib_mc]", "eval.max_bytes=3000", "eval.max_items=20"]


def _cfg(out, *extra):
    return load_config(TINY, [f"train.out_dir={out}", "train.progress=false", "train.steps=4", "train.eval_every=2",
                              "train.log_every=1", "checkpoint.every=4", "checkpoint.async_save=false", *EVAL, *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step tiny run whose `eval` section scores held-out bits per byte and 20 stdlib_mc items at
    steps 2 and 4; its model loaded back."""
    from k2jax.generate import load_run
    from k2jax.train.loop import train

    out = tmp_path_factory.mktemp("eval") / "run"
    train(_cfg(out))
    return out, load_run(out)


@pytest.fixture(scope="module")
def model32(run):
    """The run's model computing in float32, so that packed and one-row scoring agree to float32 rounding."""
    from k2jax.model.transformer import Transformer

    _, loaded = run
    model = Transformer(dataclasses.replace(loaded.config.model, compute_dtype="float32"), nnx.Rngs(0))
    nnx.update(model, nnx.state(loaded.model))
    return model


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _one_row(model, seq_len):
    """A brute-force scorer: ids (n + 1,) alone in a (1, seq_len) row (padded at the end, which causal
    attention never reads from earlier positions) -> numpy log p of each of ids[1:]."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])  # (1, T, V)

    def logprobs(ids):
        n = len(ids) - 1
        row = np.zeros((1, seq_len), np.int32)
        row[0, :n] = ids[:-1]
        logp = _log_softmax(np.asarray(forward(state, jnp.asarray(row)))[0, :n])
        return logp[np.arange(n), ids[1:]]

    return logprobs


def test_training_logs_bits_per_byte_and_task_accuracy_and_plots_them(run, tmp_path):
    out, _ = run
    records = read_metrics(out / "metrics.jsonl")
    logged = {r["step"]: r for r in records if "eval/bpb/heldout" in r}
    assert sorted(logged) == [2, 4]
    assert 3 < logged[4]["eval/bpb/heldout"] < logged[2]["eval/bpb/heldout"] < 9  # ~8 bits at random, falling
    assert all(0 <= logged[s][f"eval/stdlib_mc/{m}"] <= 1 for s in (2, 4) for m in ("acc", "acc_norm"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/bpb/heldout"] == logged[4]["eval/bpb/heldout"]
    # curves.png: two more panels (bits per byte, task accuracy) than the same metrics without them
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({k: v for k, v in r.items() if not k.startswith("eval/")}) + "\n"
                             for r in records))
    plot_run(plain, tmp_path / "plain.png")
    from matplotlib.image import imread

    width, plain_width = imread(out / "curves.png").shape[1], imread(tmp_path / "plain.png").shape[1]
    assert width == pytest.approx(plain_width * 5 / 3, rel=0.01)


def test_bits_per_byte_equals_numpy_from_the_logits(run, model32):
    _, loaded = run
    cfg = loaded.config
    seq_len = cfg.data.seq_len
    # two documents of 300 bytes with multi-byte characters: several windows each, packed several per row
    _, heldout = corpus_lib.load_corpus(cfg.data)
    docs = [heldout[0][:290] + "é ∑ 𝔘", heldout[1][:300]]
    text_set = TextSet.build("t", loaded.tokenizer, docs, seq_len)
    got = text_set.score(ModelParts.of(model32), 4, seq_len)
    logprobs = _one_row(model32, seq_len)
    nats, n_bytes = 0.0, 0
    for doc in docs:
        ids = np.concatenate([[loaded.tokenizer.bos_id], loaded.tokenizer.encode(doc)])
        for start in range(0, len(ids) - 1, seq_len):  # disjoint windows: every token predicted once
            nats -= logprobs(ids[start:start + seq_len + 1]).sum()
        n_bytes += len(doc.encode("utf-8"))
    assert got["bytes"] == n_bytes and got["tokens"] == n_bytes  # byte tokenizer: one token per byte
    assert got["bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)


def test_multiple_choice_accuracy_equals_a_brute_force_loop_over_the_choices(run, model32):
    _, loaded = run
    seq_len, tok = loaded.config.data.seq_len, loaded.tokenizer
    _, _, items = sources.load_task("stdlib_mc", "--tasks")
    task = ChoiceTask.build("stdlib_mc", tok, items, seq_len)
    lls = task.loglikelihoods(ModelParts.of(model32), 8, seq_len)
    logprobs = _one_row(model32, seq_len)
    brute = []
    for item in items:
        context = item["context"].rstrip()
        moved = item["context"][len(context):]  # lm-eval-harness: the context's trailing whitespace is scored
        scores = []
        for choice in item["choices"]:
            continuation = tok.encode(moved + choice)
            ids = np.concatenate([[tok.bos_id], tok.encode(context), continuation])[-(seq_len + 1):]
            scores.append(logprobs(ids)[-len(continuation):].sum())
        brute.append(np.asarray(scores))
    np.testing.assert_allclose(np.concatenate(lls), np.concatenate(brute), rtol=1e-5)
    # the same decisions wherever float32 rounding cannot decide them: a near-untrained model nearly ties a
    # line and its swapped-words twin (an item here within 1.3e-6 nats, where the two paths differ by ~2e-6)
    gold, choices = np.asarray([item["gold"] for item in items]), [item["choices"] for item in items]
    got = accuracy(lls, choices, gold)
    for metric, scales in (("acc", [np.ones(len(cs)) for cs in choices]),
                           ("acc_norm", [np.asarray([len(c) for c in cs], float) for cs in choices])):
        picks = [np.argmax(b / s) for b, s in zip(brute, scales)]
        error = max(np.abs(p - b).max() / s.min() for p, b, s in zip(lls, brute, scales))
        tied = [np.diff(np.sort(b / s))[-1] <= 10 * error for b, s in zip(brute, scales)]
        assert sum(tied) <= 3
        assert all(np.argmax(p / s) == pick for p, s, pick, t in zip(lls, scales, picks, tied) if not t)
        assert abs(round(got[metric] * len(items)) - np.sum(np.asarray(picks) == gold)) <= sum(tied)


def test_acc_norm_divides_by_the_choice_length_in_characters():
    lls = [np.asarray([-6.0, -4.0]), np.asarray([-2.0, -3.0])]
    choices = [["abcdef", "ab"], ["é", "xyz"]]  # -6/6 > -4/2; -2/1 < -3/3
    assert accuracy(lls, choices, np.asarray([0, 1])) == {"acc": 0.0, "acc_norm": 1.0, "items": 2}


def test_qa_normalises_like_squad_and_scores_a_fake_generator():
    assert normalize_answer("  The  Quick, brown-fox! ") == "quick brownfox"
    assert normalize_answer("An apple a day") == "apple day"
    assert exact_match("the Answer.", ["nothing", "answer"]) and not exact_match("answers", ["answer"])
    items = [{"question": "Capital of France?", "answers": ["Paris"]},
             {"question": "2 + 2?", "answers": ["4", "four"]},
             {"question": "ignored", "prompt": "def f(x):\n    return ", "answers": ["x + 1"]}]
    asked = []

    def generate(prompts):
        asked.extend(prompts)
        return [" paris.", "five", "x+1"]

    result = score_qa(items, generate)
    assert asked == ["Question: Capital of France?\nAnswer:", "Question: 2 + 2?\nAnswer:", "def f(x):\n    return "]
    assert result["em"] == pytest.approx(1 / 3) and result["predictions"] == [" paris.", "five", "x+1"]
    with pytest.raises(ValueError, match="2 answers for 3 prompts"):
        score_qa(items, lambda prompts: ["a", "b"])


def test_eval_command_writes_the_json_and_matches_the_logged_values(run, capsys):
    out, _ = run
    args = ["eval", str(out), "--tasks", "heldout,stdlib_mc", "--max-bytes", "3000", "--max-items", "20",
            "--batch-size", "8"]  # the loop's rows: train.batch_size x data.seq_len
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "heldout" in printed and "acc_norm" in printed and f"{out}/eval/step_4.json" in printed
    written = json.loads((out / "eval" / "step_4.json").read_text())
    logged = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] == 4][-1]
    assert written["step"] == 4 and written["results"]["heldout"]["bytes"] == 3000
    for key, value in written["metrics"].items():  # the final checkpoint, scored again: what training logged
        assert value == pytest.approx(logged[key], abs=1e-3), key
    # another set later: merged into the same file, the earlier results kept
    text = out.parent / "doc.txt"
    text.write_text("def add(a, b):\n    return a + b\n")
    assert main(["eval", str(out), "--tasks", "", "--text", f"snippet={text}"]) == 0
    written = json.loads((out / "eval" / "step_4.json").read_text())
    assert set(written["results"]) == {"heldout", "stdlib_mc", "snippet"}
    assert written["results"]["snippet"]["bytes"] == 32 and "eval/bpb/snippet" in written["metrics"]


def test_eval_command_answers_qa_with_the_engine(run):
    out, _ = run
    assert main(["eval", str(out), "--tasks", "stdlib_qa", "--max-items", "3"]) == 0
    qa = json.loads((out / "eval" / "step_4.json").read_text())["results"]["stdlib_qa"]
    assert qa["items"] == 3 and 0 <= qa["em"] <= 1
    assert len(qa["predictions"]) == 3 and not any("\n" in p for p in qa["predictions"])  # stopped at a newline


def test_bad_eval_input_is_one_clear_line(run, tmp_path, capsys):
    out, _ = run
    assert main(["eval", str(out), "--tasks", "heldout,nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    bad = tmp_path / "mine.jsonl"
    good = '{"context": "a", "choices": ["b", "c"], "gold": 1}\n'
    bad.write_text(good + '{"context": "a", "choices": ["b"], "gold": 0}\n')
    assert main(["eval", str(out), "--tasks", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad} line 2: 'choices' must be a list of two or more" in err and len(err.strip().splitlines()) == 1
    bad.write_text(good + '{"context": "a", \n')
    assert main(["eval", str(out), "--tasks", str(bad)]) == 2
    assert f"{bad} line 2: " in capsys.readouterr().err
    assert main(["eval", str(out), "--tasks", "", "--text", "no-equals-sign"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--tasks", "heldout"]) == 3
    assert "is not a run directory" in capsys.readouterr().err


def test_a_bad_eval_section_fails_before_anything_is_written(tmp_path):
    from k2jax.train.loop import train

    with pytest.raises(ConfigError, match="eval.tasks: unknown task 'nope'"):
        train(_cfg(tmp_path / "a", "eval.tasks=[nope]"))
    with pytest.raises(ConfigError, match="eval.tasks: stdlib_qa are generative QA tasks"):
        train(_cfg(tmp_path / "b", "eval.tasks=[stdlib_qa]"))
    with pytest.raises(ConfigError, match="eval.bits_per_byte: .*missing.txt does not exist"):
        train(_cfg(tmp_path / "c", f"eval.bits_per_byte=[x={tmp_path / 'missing.txt'}]"))
    assert not any((tmp_path / name).exists() for name in "abc")
    with pytest.raises(ConfigError, match="eval.every"):
        _cfg(tmp_path, "eval.every=0")


def test_a_resume_may_change_the_eval_section(run):
    from k2jax.train.run_dir import check_resumed_config

    out, _ = run
    check_resumed_config(out / "checkpoints", _cfg(out, "eval.tasks=[]", "eval.every=1", "eval.max_bytes=null"))
    with pytest.raises(ConfigError, match="data.seq_len"):
        check_resumed_config(out / "checkpoints", _cfg(out, "data.seq_len=32"))


def test_sweep_results_and_analyze_pick_up_the_eval_metrics(tmp_path):
    from k2jax.sweep.analysis import analyze
    from k2jax.sweep.grid import load_sweep, write_results

    spec = {"name": "t", "base": str(TINY), "out_dir": str(tmp_path / "sweep"),
            "grid": {"optim.name": ["muon", "adamw"]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    sweep = load_sweep(tmp_path / "sweep.yaml")
    for i, r in enumerate(sweep.runs):  # finished runs' summaries, as training writes them
        (sweep.out_dir / r.name).mkdir(parents=True)
        (sweep.out_dir / r.name / "summary.json").write_text(json.dumps(
            {"steps": 20, "final_eval_loss": 3.0 + i, "eval/bpb/heldout": 4.5 + i, "eval/stdlib_mc/acc": 0.25}))
    rows = list(csv.DictReader(write_results(sweep).open()))
    assert [float(r["eval/bpb/heldout"]) for r in rows] == [4.5, 5.5] and rows[0]["eval/stdlib_mc/acc"] == "0.25"
    analyze(sweep.out_dir, arm="optim.name", y="eval/bpb/heldout")
    assert "eval/bpb/heldout" in (sweep.out_dir / "report" / "report.md").read_text()


def test_shipped_tasks_load_and_are_package_data():
    assert sources.shipped_tasks() == ["stdlib_mc", "stdlib_qa"]
    kinds = {name: sources.load_task(name, "--tasks")[1:] for name in sources.shipped_tasks()}
    assert kinds["stdlib_mc"][0] == "choice" and len(kinds["stdlib_mc"][1]) == 100
    assert kinds["stdlib_qa"][0] == "qa" and len(kinds["stdlib_qa"][1]) == 50
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["k2jax.eval"]
    package = ROOT / "k2jax" / "eval"
    assert {p for g in globs for p in package.glob(g)} == set(sources.TASKS_DIR.glob("*.jsonl"))


@pytest.mark.skipif(platform.python_version() != build_tasks.BUILT_WITH,
                    reason="the shipped tasks come from this Python's standard library sources")
def test_shipped_tasks_are_what_the_script_writes(tmp_path):
    build_tasks.write(tmp_path)
    for path in sources.TASKS_DIR.glob("*.jsonl"):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
