"""Corpora, tokenizers and the grain pipeline: determinism, packing, resume, sharding, errors."""

import json
import string

import numpy as np
import pytest

from k2jax.config import ConfigError, DataConfig
from k2jax.data import tokenizer as tokenizer_lib
from k2jax.data.corpus import load_corpus
from k2jax.data.tokenizer import BPETokenizer, ByteTokenizer
from batches import eval_batches, make_train_iterator

T = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """48 documents of different lengths; document i is written with letter i alone, so any
    piece of text names the one document it came from."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    texts = {}
    for i in range(48):
        words = [string.ascii_letters[i] * int(rng.integers(1, 6)) for _ in range(int(rng.integers(3, 40)))]
        texts[f"doc{i:02d}.txt"] = " ".join(words)
        (root / f"doc{i:02d}.txt").write_text(texts[f"doc{i:02d}.txt"])
    cfg = DataConfig(corpus=str(root), seq_len=T, heldout_fraction=0.1)
    return cfg, texts


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_same_seed_same_batches_other_seed_differs(corpus):
    cfg, _ = corpus
    train, _ = load_corpus(cfg)
    tok = ByteTokenizer()
    a = _take(make_train_iterator(cfg, tok, train, 4, seed=1), 6)
    b = _take(make_train_iterator(cfg, tok, train, 4, seed=1), 6)
    c = _take(make_train_iterator(cfg, tok, train, 4, seed=2), 6)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))
    assert a[0]["inputs"].shape == (4, T) and a[0]["inputs"].dtype == np.int32


def test_packing_never_crosses_documents(corpus):
    cfg, texts = corpus
    train, _ = load_corpus(cfg)
    tok = ByteTokenizer()
    for batch in _take(make_train_iterator(cfg, tok, train, 4, seed=0), 30):
        for r in range(4):
            seg, pos = batch["segment_ids"][r], batch["positions"][r]
            inp, tgt = batch["inputs"][r], batch["targets"][r]
            assert np.all(inp[seg == 0] == 0) and np.all(tgt[seg == 0] == 0)
            for s in set(seg[seg > 0].tolist()):
                idx = np.flatnonzero(seg == s)
                assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
                np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # positions restart
                np.testing.assert_array_equal(tgt[idx[:-1]], inp[idx[1:]])  # next token in-segment
                ids = np.concatenate([inp[idx], tgt[idx[-1:]]])
                text = tok.decode(ids)
                letters = set(text) - set(" ")
                assert len(letters) <= 1, text  # never two documents in one segment
                sources = [name for name, body in texts.items() if letters <= set(body) and text.strip() in body]
                assert len(sources) == 1 or not letters, (text, sources)  # a contiguous piece of its document


def test_resume_continues_the_exact_stream(corpus):
    cfg, _ = corpus
    train, _ = load_corpus(cfg)
    tok = ByteTokenizer()
    it = make_train_iterator(cfg, tok, train, 4, seed=3)
    _take(it, 25)  # past the first epoch
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON (it goes into the checkpoint)
    expected = _take(it, 5)
    fresh = make_train_iterator(cfg, tok, train, 4, seed=3)
    fresh.set_state(state)
    for x, y in zip(expected, _take(fresh, 5)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_split_is_disjoint_stable_and_eval_fixed(corpus):
    cfg, texts = corpus
    train, heldout = load_corpus(cfg)
    assert heldout and train and not set(train) & set(heldout)
    assert len(train) + len(heldout) == len(texts)
    assert load_corpus(cfg) == (train, heldout)
    tok = ByteTokenizer()
    a = eval_batches(cfg, tok, heldout, 2, 3)
    b = eval_batches(cfg, tok, heldout, 2, 3)
    assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))


def test_shards_are_disjoint_and_cover(corpus):
    cfg, _ = corpus
    train, _ = load_corpus(cfg)
    tok = ByteTokenizer()

    def docs_seen(it, n):
        rows = set()
        for batch in _take(it, n):
            for r in range(batch["inputs"].shape[0]):
                rows |= set(tok.decode(batch["inputs"][r][batch["segment_ids"][r] > 0])) - set(" ")
        return rows

    a = docs_seen(make_train_iterator(cfg, tok, train, 2, seed=0, shard_index=0, shard_count=2), 40)
    b = docs_seen(make_train_iterator(cfg, tok, train, 2, seed=0, shard_index=1, shard_count=2), 40)
    letters = {t[0] for t in train}
    assert a and b and not a & b and (a | b) <= letters  # each process reads its own documents
    with pytest.raises(ValueError, match="shard_index"):
        make_train_iterator(cfg, tok, train, 2, seed=0, shard_index=2, shard_count=2)


def test_tokenizers_round_trip_and_save(tmp_path, corpus):
    cfg, texts = corpus
    byte = ByteTokenizer()
    text = "naïve café — 東京 🚀\n\tdef f(): return 1"
    assert byte.decode(byte.encode(text)) == text and byte.vocab_size == 259
    bpe = BPETokenizer.train(list(texts.values()) + [text] * 5, vocab_size=300)
    assert bpe.vocab_size == 300 and bpe.decode(bpe.encode(text)) == text
    assert len(bpe.encode("aaaa aaa aaaa")) < len(byte.encode("aaaa aaa aaaa"))
    bpe.save(tmp_path / "bpe")
    again = tokenizer_lib.load(tmp_path / "bpe")
    assert again.kind == "bpe" and list(again.encode(text)) == list(bpe.encode(text))
    byte.save(tmp_path / "byte")
    assert tokenizer_lib.load(tmp_path / "byte").kind == "byte"


def test_bad_corpora_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="neither 'stdlib' nor an existing"):
        load_corpus(DataConfig(corpus=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty"):
        load_corpus(DataConfig(corpus=str(tmp_path / "empty")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ConfigError, match="line 2"):
        load_corpus(DataConfig(corpus=str(bad)))


def test_stdlib_corpus_is_available():
    train, heldout = load_corpus(DataConfig(max_corpus_bytes=300_000))
    assert train and heldout and sum(map(len, train)) > 100_000


def test_in_memory_corpus_reports_skipped_and_junk_files(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("def f():\n    return 1\n" * 50)
    (tmp_path / "b.md").write_text("# notes\n" * 50)
    (tmp_path / "c.csv").write_text("x,y\n")
    train, heldout = load_corpus(DataConfig(corpus=str(tmp_path)))
    assert len(train) == len(heldout) == 1
    assert "warning: 1 file not read, unsupported suffixes (1 .csv)" in capsys.readouterr().err
    (tmp_path / "d.txt").write_bytes(bytes(range(256)) * 20)  # control characters and bytes that never decode
    with pytest.raises(ConfigError, match="d.txt is not UTF-8 text"):
        load_corpus(DataConfig(corpus=str(tmp_path)))
    only_csv = tmp_path / "csv"
    only_csv.mkdir()
    (only_csv / "t.csv").write_text("x\n")
    with pytest.raises(ConfigError, match=r"is empty: no text documents found \(1 file not read"):
        load_corpus(DataConfig(corpus=str(only_csv)))
