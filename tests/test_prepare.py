"""`k2jax prepare`: text/JSONL/Parquet -> tokenized ArrayRecord shards -> the same chunks as in memory."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k2jax.cli import main
from k2jax.config import ConfigError, load_config
from k2jax.data import corpus as corpus_lib
from k2jax.data import tokenizer as tokenizer_lib
from k2jax.data.pipeline import chunk_documents
from k2jax.data.prepared import PreparedCorpus, prepare
from k2jax.train.loop import train

ROOT = Path(__file__).parents[1]


def _stdlib_texts(n: int, size: int = 3000) -> list[str]:
    docs = corpus_lib.iter_documents("stdlib")
    return [text[:size] for _, text in (next(docs) for _ in range(n))]


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    """JSONL, Parquet and plain files in nested directories."""
    root = tmp_path_factory.mktemp("sources")
    texts = _stdlib_texts(60)
    with (root / "a.jsonl").open("w") as f:
        for t in texts[:25]:
            f.write(json.dumps({"text": t, "meta": 1}) + "\n")
    pq.write_table(pa.table({"text": texts[25:50]}), root / "b.parquet")
    (root / "notes").mkdir()
    for i, t in enumerate(texts[50:]):
        (root / "notes" / f"{i}.txt").write_text(t)
    return root


def _as_set(chunks) -> list[tuple]:
    return sorted(tuple(int(v) for v in chunks[i]) for i in range(len(chunks)))


def test_prepared_chunks_equal_in_memory_chunks(source_dir, tmp_path):
    out = tmp_path / "prepared"
    manifest = prepare([str(source_dir)], out, heldout_fraction=0.3, shard_tokens=5000)
    assert not (tmp_path / "prepared.partial").exists()
    docs = list(corpus_lib.iter_documents(source_dir))
    assert len(docs) == 60
    tok = tokenizer_lib.ByteTokenizer()
    corpus = PreparedCorpus(out)
    for split, held in (("train", False), ("heldout", True)):
        texts = [t for name, t in docs if corpus_lib.is_heldout(name, 0.3) == held]
        info = manifest["splits"][split]
        assert info["documents"] == len(texts) > 0
        assert info["tokens"] == sum(len(tok.encode(t)) + 2 for t in texts)
        assert _as_set(corpus.chunks(split, 16)) == _as_set(chunk_documents(tok, texts, 16))
    assert len(manifest["splits"]["train"]["files"]) > 3  # rolled over to new shards
    # two processes see disjoint documents that together are all of them
    halves = [_as_set(corpus.chunks("train", 16, i, 2)) for i in range(2)]
    assert sorted(halves[0] + halves[1]) == _as_set(corpus.chunks("train", 16))


def test_existing_tokenizers_sentencepiece_and_tokenizer_json(tmp_path):
    import sentencepiece as spm
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = _stdlib_texts(40)
    (tmp_path / "corpus.txt").write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=300, model_type="bpe", minloglevel=2)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                      show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    references = {
        "sp.model": lambda t: [sp.bos_id(), *sp.encode(t), sp.eos_id()],
        "tokenizer.json": lambda t: [0, *hf.encode(t).ids, 0],  # <|endoftext|> is id 0, used for bos and eos
    }
    for spec, reference in references.items():
        out = tmp_path / f"out-{spec}"
        prepare([str(src)], out, tokenizer=str(tmp_path / spec), heldout_fraction=0.2)
        corpus = PreparedCorpus(out)
        loaded = corpus.tokenizer()
        train_texts = [t for name, t in corpus_lib.iter_documents(src) if not corpus_lib.is_heldout(name, 0.2)]
        expected = [tuple(reference(t)) for t in train_texts]
        got = corpus.chunks("train", 10_000)  # one chunk per document
        assert sorted(tuple(int(v) for v in got[i]) for i in range(len(got))) == sorted(expected), spec
        assert [loaded.bos_id, *loaded.encode(train_texts[0]), loaded.eos_id] == reference(train_texts[0]), spec


def test_prepare_then_train_through_the_cli(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _stdlib_texts(150, 4000)))
    out = tmp_path / "prepared"
    assert main(["prepare", str(src), "--out", str(out), "--tokenizer", "bpe", "--bpe-vocab-size", "300",
                 "--heldout-fraction", "0.05"]) == 0
    assert "train on it with" in capsys.readouterr().out
    run = tmp_path / "run"
    cfg = load_config(ROOT / "experiments" / "tiny.yaml",
                      [f"data.corpus={out}", f"train.out_dir={run}", "train.steps=12", "train.eval_every=6",
                       "train.log_every=1", "train.progress=false", "checkpoint.async_save=false"])
    summary = train(cfg)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.3 and np.isfinite(summary["final_eval_loss"])
    assert tokenizer_lib.load(run / "tokenizer").vocab_size == 300  # the prepared tokenizer travels with the run


def test_bad_inputs_fail_clearly_and_leave_nothing(source_dir, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        prepare([str(source_dir)], out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="does not exist"):
        prepare([str(tmp_path / "missing.jsonl")], tmp_path / "a")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(ConfigError, match="line 2"):
        prepare([str(bad)], tmp_path / "b")
    with pytest.raises(ConfigError, match="--tokenizer"):
        prepare([str(source_dir)], tmp_path / "c", tokenizer="nonsense.bin")
    with pytest.raises(ConfigError, match="'body' column"):
        prepare([str(source_dir / "b.parquet")], tmp_path / "d", text_field="body")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "exists"]  # no partial output left
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{")
    with pytest.raises(ConfigError, match="manifest.json"):
        PreparedCorpus(broken)


def test_small_corpus_holds_out_one_document_and_sizes_the_vocabulary(tmp_path, capsys):
    src = tmp_path / "small"
    src.mkdir()
    for i, text in enumerate(_stdlib_texts(30, 2000)):
        (src / f"{i:02d}.py").write_text(text)
    (src / "table.csv").write_text("a,b\n")
    out = tmp_path / "prepared"
    manifest = prepare([str(src)], out, tokenizer="bpe", bpe_vocab_size=400)  # default 1% held out
    assert manifest["splits"]["heldout"]["documents"] >= 1
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["heldout"]["documents"] == 30
    assert "1 file not read, unsupported suffixes (1 .csv)" in capsys.readouterr().err
    vocab = manifest["vocab_size"]
    assert vocab > 320  # more than the tiny preset's
    assert load_config(ROOT / "experiments" / "tiny.yaml", [f"data.corpus={out}"]).model.vocab_size == vocab
    explicit = load_config(ROOT / "experiments" / "tiny.yaml",
                           [f"data.corpus={out}", "model.vocab_size=320", f"train.out_dir={tmp_path / 'run'}"])
    assert explicit.model.vocab_size == 320
    with pytest.raises(ConfigError, match=f"model.vocab_size=320 is smaller than the tokenizer's vocabulary "
                                          f"\\({vocab}\\); set it to at least {vocab}"):
        train(explicit)


def test_unsupported_files_are_named_not_blamed_on_the_split(tmp_path):
    src = tmp_path / "csvs"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.csv").write_text("x,y\n1,2\n")
    (src / "page.html").write_text("<p>hi</p>")
    with pytest.raises(ConfigError, match=r"gave 0 documents, at least 2 are needed \(one to train on, one held "
                                          r"out\); 4 files not read, unsupported suffixes \(3 .csv, 1 .html\)") as e:
        prepare([str(src)], tmp_path / "out")
    assert "heldout" not in str(e.value) and not (tmp_path / "out").exists()


def test_binary_junk_is_refused_and_named(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "mixed"
    src.mkdir()
    for i, text in enumerate(_stdlib_texts(4, 2000)):
        (src / f"{i}.py").write_text(text)
    (src / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 20 + b"plain text " * 100)  # 20 bad bytes
    (src / "junk.txt").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ConfigError, match="junk.txt is not UTF-8 text: .* bytes .* are undecodable or control"):
        prepare([str(src)], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    (src / "junk.txt").unlink()
    prepare([str(src)], tmp_path / "out")
    assert "latin1.txt (1.7%)" in capsys.readouterr().err
