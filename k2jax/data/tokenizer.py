"""Tokenizers: byte-level (default, nothing to train) and BPE trained locally with `tokenizers`.

Both reserve ids 0 (pad), 1 (bos) and 2 (eos), and save to / load from a
directory kept with the run, so a resumed run or a sampler reads the same
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
        data = bytes(int(i) - len(SPECIALS) for i in ids if int(i) >= len(SPECIALS))
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


def build_tokenizer(cfg: DataConfig, train_texts: list[str]):
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    return BPETokenizer.train(train_texts, cfg.bpe_vocab_size)


def load(directory: str | Path):
    """Load the tokenizer a run saved."""
    directory = Path(directory)
    meta = directory / "tokenizer_kind.json"
    if not meta.is_file():
        raise FileNotFoundError(f"no saved tokenizer in {directory}")
    kind = json.loads(meta.read_text())["kind"]
    if kind == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    return BPETokenizer(Tokenizer.from_file(str(directory / "tokenizer.json")))
