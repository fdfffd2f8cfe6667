"""data.sources: prepared corpora mixed by token share, counted per source, exact on resume; rephrase outputs
prepared with their provenance."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from k2jax.config import ConfigError, load_config
from k2jax.config.schema import SourceConfig
from k2jax.data.mixture import Sources, tokenizer_digest
from k2jax.data.prepared import PreparedCorpus, prepare
from k2jax.train.loop import train

ROOT = Path(__file__).parents[1]


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """Two byte-level corpora whose tokens tell them apart: 'long' (letters a-m) and 'short' (digits)."""
    root = tmp_path_factory.mktemp("mixture")
    rng = np.random.default_rng(0)
    long_texts = ["".join(rng.choice(list("abcdefghijklm "), size=rng.integers(100, 400))) for _ in range(120)]
    short_texts = ["".join(rng.choice(list("0123456789 "), size=rng.integers(20, 60))) for _ in range(80)]
    out = {}
    for name, texts in (("long", long_texts), ("short", short_texts)):
        out[name] = root / f"prepared-{name}"
        prepare([str(_jsonl(root / f"{name}.jsonl", texts))], out[name], heldout_fraction=0.1)
    return out


def test_token_shares_follow_the_weights_and_the_counts_are_the_batches(corpora):
    sources = Sources((SourceConfig(str(corpora["long"]), weight=3.0), SourceConfig(str(corpora["short"]))), 32)
    it = sources.iterator(batch_size=8, seed=1)
    digits = letters = 0
    for _ in range(300):
        batch = next(it)
        real = batch["segment_ids"] > 0
        targets = batch["targets"][real]
        is_digit = np.isin(targets, [ord(c) for c in "0123456789"])
        is_letter = np.isin(targets, [ord(c) for c in "abcdefghijklm"])
        digits, letters = digits + is_digit.sum(), letters + is_letter.sum()
        assert set(batch) == {"inputs", "targets", "segment_ids", "positions"}  # the tags stay on the host
    share = it.tokens / it.tokens.sum()
    np.testing.assert_allclose(share, [0.75, 0.25], atol=0.02)
    # the counts agree with the tokens' content: only 'short' has digits, only 'long' has letters
    assert digits <= it.tokens[1] and letters <= it.tokens[0]
    assert digits > 0.6 * it.tokens[1] and letters > 0.6 * it.tokens[0]


def test_iterator_state_resumes_batches_and_counts_exactly(corpora):
    configs = (SourceConfig(str(corpora["long"])), SourceConfig(str(corpora["short"]), weight=0.5))
    sources = Sources(configs, 32)
    first = sources.iterator(batch_size=4, seed=0)
    for _ in range(37):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    expected = [next(first) for _ in range(20)]
    again = Sources(configs, 32).iterator(batch_size=4, seed=0)
    again.set_state(state)
    for want in expected:
        got = next(again)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    np.testing.assert_array_equal(again.tokens, first.tokens)


def test_bad_mixtures_are_refused_with_the_source_named(corpora, tmp_path):
    other = tmp_path / "bpe"
    prepare([str(_jsonl(tmp_path / "t.jsonl", [f"text number {i} " * 20 for i in range(30)]))], other,
            tokenizer="bpe", bpe_vocab_size=300, heldout_fraction=0.1)
    with pytest.raises(ConfigError, match=r"data.sources\[1\] \(bpe\): its tokenizer differs"):
        Sources((SourceConfig(str(corpora["long"])), SourceConfig(str(other))), 32)
    with pytest.raises(ConfigError, match=r"data.sources\[0\] \(nowhere\): .*manifest.json"):
        Sources((SourceConfig(str(tmp_path / "nowhere")),), 32)
    capped = Sources((SourceConfig(str(corpora["long"])), SourceConfig(str(corpora["short"]), max_epochs=2)), 32)
    capped.check_epochs(tokens=capped.train[1].pairs * 2)  # half the tokens: one epoch of 'short'
    with pytest.raises(ConfigError, match=r"data.sources\[1\] \(prepared-short\): .* above its max_epochs=2"):
        capped.check_epochs(tokens=capped.train[1].pairs * 5)
    for sets, match in ((["data.corpus=elsewhere", f"data.sources=[{{path: {corpora['long']}}}]"], "not both"),
                        ([f"data.sources=[{{path: {corpora['long']}, weight: 0}}]"], "weight: must be positive"),
                        ([f"data.sources=[{{path: {corpora['long']}}}, {{path: {corpora['long']}}}]"],
                         "names must differ")):
        with pytest.raises(ConfigError, match=match):
            load_config(ROOT / "experiments" / "tiny.yaml", sets)


def _config(corpora: dict, run: Path, steps: int):
    sources = (f"data.sources=[{{path: {corpora['long']}, weight: 2}}, "
               f"{{path: {corpora['short']}, name: digits, max_epochs: 50}}]")
    return load_config(ROOT / "experiments" / "tiny.yaml",
                       [sources, f"train.out_dir={run}", f"train.steps={steps}", "train.log_every=2",
                        "train.eval_every=8", "checkpoint.every=8", "train.progress=false",
                        "checkpoint.async_save=false"])


def _records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_training_on_a_mixture_logs_tokens_per_source_and_resumes_exactly(corpora, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_config(corpora, straight, 16))
    # the run as a kill after the step-8 save leaves it: that checkpoint, the metrics up to step 8
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "16")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for s, r in _records(straight).items() if s <= 8))
    train(_config(corpora, resumed, 16), resume=True)
    a, b = _records(straight), _records(resumed)
    assert sorted(a) == sorted(b)
    for step in a:
        for key in ("loss", "data/tokens/prepared-long", "data/tokens/digits", "data/epochs/digits"):
            assert a[step][key] == b[step][key], (step, key)
    last = a[16]
    share = last["data/tokens/prepared-long"] / (last["data/tokens/prepared-long"] + last["data/tokens/digits"])
    assert abs(share - 2 / 3) < 0.05
    assert last["data/tokens/prepared-long"] + last["data/tokens/digits"] <= 16 * 8 * 64  # steps x rows x seq_len
    assert (straight / "curves.png").is_file()


def test_rephrase_output_is_prepared_from_committed_parts_with_its_provenance(tmp_path):
    out = tmp_path / "rephrased"
    out.mkdir()
    records = [{"id": f"doc{d}#{r}", "text": f"rewrite {r} of document {d}", "source_id": f"doc{d}"}
               for d in range(40) for r in range(3)]
    (out / "part-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "part-00001.jsonl").write_text(json.dumps({"id": "x#0", "text": "a part no manifest lists"}) + "\n")
    settings = {"model": "m", "prompt_set": "knowledge", "rephrasings": 3}
    (out / "manifest.json").write_text(json.dumps({"format": "k2jax-rephrase-v1", "settings": settings,
                                                   "parts": [{"file": "part-00000.jsonl", "dropped": []}],
                                                   "counts": {"rewrites": 120}}))
    (out / "summary.json").write_text("{}")
    reused = tmp_path / "reused"
    manifest = prepare([str(out)], tmp_path / "prepared", heldout_fraction=0.25, tokenizer="bpe", bpe_vocab_size=280)
    assert manifest["provenance"] == {str(out): [{"settings": settings, "counts": {"rewrites": 120}}]}
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["heldout"]["documents"] == 120  # not the unlisted part
    # every rewrite of a document falls in one split: held-out documents come in threes
    assert splits["heldout"]["documents"] % 3 == 0 and splits["heldout"]["documents"] > 0
    # a prepared corpus's tokenizer is reused as it is
    prepare([str(out)], reused, tokenizer=str(tmp_path / "prepared"), heldout_fraction=0.25)
    assert tokenizer_digest(reused / "tokenizer") == tokenizer_digest(tmp_path / "prepared" / "tokenizer")
    assert PreparedCorpus(reused).tokenizer().vocab_size == 280
