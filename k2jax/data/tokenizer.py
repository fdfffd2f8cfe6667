"""Tokenizers: byte-level (default, nothing to train), BPE trained locally with
`tokenizers`, and existing ones: a Hugging Face tokenizer.json, a sentencepiece
model, or a tiktoken.model + tokenizer_config.json (Kimi-K2's format).

Byte and local BPE reserve ids 0 (pad), 1 (bos) and 2 (eos); existing
tokenizers keep their own ids. All save to / load from a directory kept with the
run (or the prepared corpus), so a resumed run or a sampler reads the same
vocabulary.
"""

from __future__ import annotations

import base64
import json
import re
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


# Kimi-K2's split regex: TikTokenTokenizer.pat_str in the model repository's tokenization_kimi.py.
KIMI_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
KIMI_RESERVED_SPECIALS = 256
# K2 encodes 400,000-character chunks, each cut inside any run of whitespace or of non-whitespace every
# 25,000 characters (tiktoken's BPE is quadratic in the length of one piece).
_CHUNK, _RUN = 400_000, 25_000
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{_RUN + 1},}}|(?<!\s)\s{{{_RUN + 1},}}")


def _read_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    """tiktoken.model's `base64(token) rank` lines, parsed as tiktoken.load.load_tiktoken_bpe does (which
    caches by path in the temp directory and names no line number)."""
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}, line {n}: expected 'base64(token) rank', got {line[:80]!r}") from None
    if set(ranks.values()) != set(range(len(ranks))):
        raise ValueError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def _token_text(token) -> str | None:
    """A tokenizer_config.json token entry: a string or an AddedToken dict ({"content": ...})."""
    return token.get("content") if isinstance(token, dict) else token


class TiktokenTokenizer:
    """A tiktoken.model with its tokenizer_config.json, as Kimi-K2 ships them: special tokens take the
    256 ids after the ranks, named by added_tokens_decoder or `<|reserved_token_{id}|>`."""

    kind = "tiktoken"
    FILES = ("tiktoken.model", "tokenizer_config.json")

    def __init__(self, directory: str | Path, bos: str | int | None = None, eos: str | int | None = None,
                 pat_str: str = KIMI_PAT_STR):
        """bos/eos (special-token text or an id) override the config's bos_token/eos_token; bos defaults
        to eos, pad to the config's pad_token, else eos."""
        import tiktoken

        model_path, self._config_path = (Path(directory) / name for name in self.FILES)
        for path in (model_path, self._config_path):
            if not path.is_file():
                raise ValueError(f"{path} not found: a tiktoken tokenizer is tiktoken.model with "
                                 f"tokenizer_config.json beside it")
        self._files = {path.name: path.read_bytes() for path in (model_path, self._config_path)}
        ranks = _read_ranks(self._files["tiktoken.model"], model_path)
        try:
            self._config = json.loads(self._files["tokenizer_config.json"])
            named = {int(i): _token_text(t) for i, t in self._config.get("added_tokens_decoder", {}).items()}
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{self._config_path}: not a tokenizer config with added_tokens_decoder "
                             f"{{id: {{'content': ...}}}} ({e})") from None
        self._n_ranks = len(ranks)
        if named and min(named) < self._n_ranks:
            raise ValueError(f"{self._config_path}: added token id {min(named)} is one of tiktoken.model's "
                             f"ranks (0..{self._n_ranks - 1})")
        end = max([self._n_ranks + KIMI_RESERVED_SPECIALS, *(i + 1 for i in named)])
        self.special_tokens = {named.get(i) or f"<|reserved_token_{i}|>": i for i in range(self._n_ranks, end)}
        self.pat_str = pat_str
        self._enc = tiktoken.Encoding(str(model_path), pat_str=pat_str, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)
        self.vocab_size = self._enc.n_vocab
        self.eos_id = self._role_id(eos, "eos")
        if self.eos_id is None:
            raise ValueError(f"{self._config_path}: no eos_token; name it with --eos-token")
        bos_id, pad_id = self._role_id(bos, "bos"), self._role_id(None, "pad")
        self.bos_id = self.eos_id if bos_id is None else bos_id
        self.pad_id = self.eos_id if pad_id is None else pad_id

    def _role_id(self, given: str | int | None, role: str) -> int | None:
        """The id of `given` (text or id), else of the config's `{role}_token`; None if neither names one."""
        if isinstance(given, int):
            if not 0 <= given < self.vocab_size:
                raise ValueError(f"the {role} id {given} is outside the vocabulary (0..{self.vocab_size - 1})")
            return given
        name = given or _token_text(self._config.get(f"{role}_token"))
        if name is None:
            return None
        if name not in self.special_tokens:
            raise ValueError(f"{self._config_path}: the {role} token {name!r} is not a special token")
        return self.special_tokens[name]

    @classmethod
    def from_dir(cls, directory: str | Path, bos: str | None = None, eos: str | None = None) -> "TiktokenTokenizer":
        """The tiktoken.model + tokenizer_config.json in `directory`; bos/eos: special-token text."""
        return cls(directory, bos, eos)

    def encode(self, text: str) -> np.ndarray:
        """Special-token text is encoded as plain text."""
        ids = []
        for start in range(0, len(text), _CHUNK):
            chunk, cut = text[start:start + _CHUNK], 0
            for run in _LONG_RUN.finditer(chunk):
                for end in range(run.start() + _RUN, run.end(), _RUN):
                    ids += self._enc.encode_ordinary(chunk[cut:end])
                    cut = end
            ids += self._enc.encode_ordinary(chunk[cut:])
        return np.asarray(ids, np.int32)

    def decode(self, ids) -> str:
        """Special and out-of-range ids are skipped."""
        return self._enc.decode([i for i in map(int, ids) if 0 <= i < self._n_ranks])

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for name, data in self._files.items():
            (Path(directory) / name).write_bytes(data)
        (Path(directory) / "tokenizer_kind.json").write_text(json.dumps(
            {"kind": self.kind, "bos_id": self.bos_id, "eos_id": self.eos_id, "pat_str": self.pat_str}))


def build_tokenizer(cfg: DataConfig, train_texts: list[str]):
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    return BPETokenizer.train(train_texts, cfg.bpe_vocab_size)


def from_spec(spec: str, train_texts=(), bpe_vocab_size: int = 8192, bos: str | None = None,
              eos: str | None = None):
    """`byte`, `bpe` (trained on train_texts), a tokenizer.json path, a sentencepiece .model path, a tiktoken.model
    path (tokenizer_config.json beside it), or a directory: a saved tokenizer (a run's or a prepared corpus's,
    itself or in tokenizer/), reused as it is, else one holding a tiktoken.model."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        return BPETokenizer.train(list(train_texts), bpe_vocab_size)
    path = Path(spec)
    if path.is_dir():
        saved = next((d for d in (path, path / "tokenizer") if (d / "tokenizer_kind.json").is_file()), None)
        if saved is not None:
            return load(saved)
        if (path / "tiktoken.model").is_file():
            return TiktokenTokenizer.from_dir(path, bos, eos)
        raise ValueError(f"tokenizer {spec!r}: the directory holds no saved tokenizer (tokenizer_kind.json, "
                         f"itself or in tokenizer/) and no tiktoken.model")
    if path.suffix == ".json" and path.is_file():
        return HFTokenizer.from_file(path, bos, eos)
    if path.name == "tiktoken.model" and path.is_file():
        return TiktokenTokenizer.from_dir(path.parent, bos, eos)
    if path.suffix == ".model" and path.is_file():
        return SentencePieceTokenizer.from_file(path)
    raise ValueError(f"tokenizer {spec!r}: expected 'byte', 'bpe', an existing tokenizer.json, a "
                     f"sentencepiece .model file, a tiktoken.model or a directory with a saved tokenizer")


def from_hf_dir(directory: str | Path):
    """The tokenizer of a Hugging Face model directory: a k2jax-saved tokenizer/, else tokenizer.json, else
    tiktoken.model (with tokenizer_config.json), else a sentencepiece tokenizer.model."""
    directory = Path(directory)
    if (directory / "tokenizer" / "tokenizer_kind.json").is_file():
        return load(directory / "tokenizer")
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer.from_file(directory / "tokenizer.json")
    if (directory / "tiktoken.model").is_file():
        return TiktokenTokenizer.from_dir(directory)
    if (directory / "tokenizer.model").is_file():
        return SentencePieceTokenizer.from_file(directory / "tokenizer.model")
    raise ValueError(f"{directory} has no tokenizer: looked for tokenizer/tokenizer_kind.json (as k2jax saves "
                     f"it), tokenizer.json, tiktoken.model and tokenizer.model")


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
    if info["kind"] == "tiktoken":
        return TiktokenTokenizer(directory, info["bos_id"], info["eos_id"], info["pat_str"])
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    if info["kind"] == "hf":
        return HFTokenizer(tok, info["bos_id"], info["eos_id"])
    return BPETokenizer(tok)


_PROBE = "def f(x):\n    return x ** 2  # 平方 — naïve café, 12345 tokens!\t<eos>"


def same(a, b) -> bool:
    """Whether two tokenizers give the same ids (same kind, vocabulary size, bos/eos and ids of a probe text)."""
    return (a.kind == b.kind and a.vocab_size == b.vocab_size and (a.bos_id, a.eos_id) == (b.bos_id, b.eos_id)
            and np.array_equal(a.encode(_PROBE), b.encode(_PROBE)))
