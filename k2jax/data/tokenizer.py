"""Tokenizers: byte-level (default, nothing to train), BPE trained locally with
`tokenizers`, and existing ones: a Hugging Face tokenizer.json or a sentencepiece
model.

Byte and local BPE reserve ids 0 (pad), 1 (bos) and 2 (eos); existing
tokenizers keep their own ids. All save to / load from a directory kept with the
run (or the prepared corpus), so a resumed run or a sampler reads the same
vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from k2jax.config import DataConfig

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ["<pad>", "<bos>", "<eos>"]


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256 + len(SPECIALS)
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + len(SPECIALS)

    def decode(self, ids) -> str:
        data = bytes(int(i) - len(SPECIALS) for i in ids if len(SPECIALS) <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "tokenizer_kind.json").write_text(json.dumps({"kind": self.kind}))


class BPETokenizer:
    kind = "bpe"
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._tok.save(str(Path(directory) / "tokenizer.json"))
        (Path(directory) / "tokenizer_kind.json").write_text(json.dumps({"kind": self.kind}))


class HFTokenizer(BPETokenizer):
    """An existing Hugging Face tokenizer.json, with its own bos/eos tokens."""

    kind = "hf"
    BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[BOS]")
    EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "[EOS]")

    def __init__(self, tok, bos_id: int, eos_id: int):
        super().__init__(tok)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, eos_id

    @classmethod
    def from_file(cls, path: str | Path, bos: str | None = None, eos: str | None = None) -> "HFTokenizer":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        vocab = tok.get_vocab(with_added_tokens=True)

        def find(given, names, role):
            if given and given not in vocab:
                raise ValueError(f"{path}: the {role} token {given!r} is not in the vocabulary")
            return vocab[given] if given else next((vocab[n] for n in names if n in vocab), None)

        eos_id = find(eos, cls.EOS_NAMES, "eos")
        if eos_id is None:
            raise ValueError(f"{path}: no end-of-text token among {cls.EOS_NAMES}; name it with --eos-token")
        bos_id = find(bos, cls.BOS_NAMES, "bos")
        return cls(tok, eos_id if bos_id is None else bos_id, eos_id)  # GPT-2 style: <|endoftext|> for both

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def save(self, directory: str | Path) -> None:
        super().save(directory)
        (Path(directory) / "tokenizer_kind.json").write_text(
            json.dumps({"kind": self.kind, "bos_id": self.bos_id, "eos_id": self.eos_id}))


class SentencePieceTokenizer:
    """An existing sentencepiece model (.model file), with its own bos/eos ids."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError("the sentencepiece model defines no bos or eos piece; k2jax needs both "
                             "to mark document boundaries")
        self.pad_id = max(self._sp.pad_id(), 0)

    @classmethod
    def from_file(cls, path: str | Path) -> "SentencePieceTokenizer":
        return cls(Path(path).read_bytes())

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "tokenizer.model").write_bytes(self._proto)
        (Path(directory) / "tokenizer_kind.json").write_text(json.dumps({"kind": self.kind}))


def build_tokenizer(cfg: DataConfig, train_texts: list[str]):
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    return BPETokenizer.train(train_texts, cfg.bpe_vocab_size)


def from_spec(spec: str, train_texts=(), bpe_vocab_size: int = 8192, bos: str | None = None,
              eos: str | None = None):
    """`byte`, `bpe` (trained on train_texts), a tokenizer.json path, a sentencepiece .model path, or a directory
    holding a saved tokenizer: a run's or a prepared corpus's (its tokenizer/), reused as it is."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        return BPETokenizer.train(list(train_texts), bpe_vocab_size)
    path = Path(spec)
    if path.is_dir():
        saved = next((d for d in (path, path / "tokenizer") if (d / "tokenizer_kind.json").is_file()), None)
        if saved is None:
            raise ValueError(f"tokenizer {spec!r}: the directory holds no saved tokenizer (tokenizer_kind.json, "
                             f"itself or in tokenizer/)")
        return load(saved)
    if path.suffix == ".json" and path.is_file():
        return HFTokenizer.from_file(path, bos, eos)
    if path.suffix == ".model" and path.is_file():
        return SentencePieceTokenizer.from_file(path)
    raise ValueError(f"tokenizer {spec!r}: expected 'byte', 'bpe', an existing tokenizer.json, a "
                     f"sentencepiece .model file or a directory with a saved tokenizer")


def load(directory: str | Path):
    """Load the tokenizer a run (or a prepared corpus) saved."""
    directory = Path(directory)
    meta = directory / "tokenizer_kind.json"
    if not meta.is_file():
        raise FileNotFoundError(f"no saved tokenizer in {directory}")
    info = json.loads(meta.read_text())
    if info["kind"] == "byte":
        return ByteTokenizer()
    if info["kind"] == "sentencepiece":
        return SentencePieceTokenizer.from_file(directory / "tokenizer.model")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    if info["kind"] == "hf":
        return HFTokenizer(tok, info["bos_id"], info["eos_id"])
    return BPETokenizer(tok)
