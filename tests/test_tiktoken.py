"""Kimi-K2's tokenizer format (tiktoken.model + tokenizer_config.json) on a tiny vocabulary built here:
ids as tiktoken itself gives them, special tokens, save/load, discovery, errors."""

import base64
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import regex
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from k2jax.data import tokenizer as tokenizer_lib
from k2jax.data.tokenizer import BPETokenizer, ByteTokenizer, TiktokenTokenizer

# TikTokenTokenizer.pat_str of moonshotai's tokenization_kimi.py, written out here as the reference.
K2_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
TRAIN = ("the theory of the thing: they don't think the other one is there. 你好，世界！你好吗？我们在这里。"
         "1234 5678 12 123 in the beginning, then another and another. It's done; we'll see. ") * 3
TEXTS = [
    "hello world",
    "The theory, they said, isn't there.",
    "你好世界，今天天气很好。",
    "mixed 中文 and English 混合 text",
    "digits 1234567890 and 3.14159 and 2024-06-30",
    "don't won't I'LL we've they'd she's",
    "line one\nline two\n\n\n  indented\r\n\ttab\n",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 ok",
    "Ça va? naïve façade. Привет мир. こんにちは 안녕하세요",
    "camelCaseWords HTTPServer XMLHttpRequest",
    "   leading and trailing spaces   ",
    "special text [BOS] [EOS] <|im_end|> <|reserved_token_7|> stays text",
    "",
]
N_MERGES = 60
N_RANKS = 256 + N_MERGES


def learn_ranks(text: str, n_merges: int) -> dict[bytes, int]:
    """All 256 bytes, then the most frequent adjacent pair within K2's pre-split pieces, n_merges times."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in piece.encode()] for piece in regex.findall(K2_PAT_STR, text, flags=regex.V1)]
    for _ in range(n_merges):
        pairs = Counter(p for w in words for p in zip(w, w[1:]))
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == [a, b]:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(out)
        words = merged
    return ranks


def write_tokenizer(directory, ranks, **config):
    """tiktoken.model (in rank order) and a K2-style tokenizer_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    (directory / "tiktoken.model").write_text("\n".join(lines) + "\n")
    n = len(ranks)
    added = {str(n): "[BOS]", str(n + 1): "[EOS]", str(n + 2): "<|im_end|>", str(n + 255): "[PAD]"}
    cfg = {"added_tokens_decoder": {i: {"content": c, "special": True} for i, c in added.items()},
           "bos_token": "[BOS]", "eos_token": {"content": "[EOS]", "__type": "AddedToken"}, **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return directory


@pytest.fixture(scope="module")
def ranks():
    ranks = learn_ranks(TRAIN, N_MERGES)
    assert len(ranks) == N_RANKS
    return ranks


@pytest.fixture
def k2_dir(tmp_path, ranks):
    return write_tokenizer(tmp_path / "k2", ranks)


def k2_specials(directory, n):
    """Special tokens as tokenization_kimi.py numbers them: the 256 ids after the n ranks."""
    added = json.loads((directory / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    return {added[str(i)]["content"] if str(i) in added else f"<|reserved_token_{i}|>": i for i in range(n, n + 256)}


@pytest.fixture
def reference(k2_dir, monkeypatch):
    """tiktoken's own Encoding of the same files, built as tokenization_kimi.py builds it."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cached copy of the file in the temp directory
    mergeable = load_tiktoken_bpe(str(k2_dir / "tiktoken.model"))
    return tiktoken.Encoding("k2-reference", pat_str=K2_PAT_STR, mergeable_ranks=mergeable,
                             special_tokens=k2_specials(k2_dir, len(mergeable)))


def test_encode_matches_tiktoken_and_round_trips(k2_dir, reference):
    assert tokenizer_lib.KIMI_PAT_STR == K2_PAT_STR
    tok = TiktokenTokenizer.from_dir(k2_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        assert ids.tolist() == reference.encode(text, disallowed_special=()), text
        assert tok.decode(ids) == text
    assert len(tok.encode(TEXTS[1])) < len(TEXTS[1].encode())  # the merges are used


def test_special_tokens(k2_dir, ranks, reference):
    tok = TiktokenTokenizer.from_dir(k2_dir)
    n = N_RANKS
    assert tok.kind == "tiktoken" and tok.vocab_size == n + 256 == reference.n_vocab
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, n + 1)  # no pad_token in the config: eos
    assert tok.special_tokens["<|im_end|>"] == n + 2 and tok.special_tokens["[PAD]"] == n + 255
    assert tok.special_tokens[f"<|reserved_token_{n + 3}|>"] == n + 3
    assert tok.special_tokens == k2_specials(k2_dir, n)
    ids = tok.encode("[BOS]<|im_end|>[EOS]")
    assert ids.max() < n and tok.decode(ids) == "[BOS]<|im_end|>[EOS]"
    body = tok.encode("hi there").tolist()
    assert tok.decode([tok.bos_id, *body, n + 2, tok.eos_id, n + 100, n + 256, -1]) == "hi there"

    padded = TiktokenTokenizer.from_dir(write_tokenizer(k2_dir.parent / "padded", ranks, pad_token="[PAD]"))
    assert (padded.eos_id, padded.pad_id) == (n + 1, n + 255)
    chat = TiktokenTokenizer.from_dir(k2_dir, bos="[EOS]", eos="<|im_end|>")
    assert (chat.bos_id, chat.eos_id, chat.pad_id) == (n + 1, n + 2, n + 2)
    with pytest.raises(ValueError, match=r"the eos token '<\|nope\|>' is not a special token"):
        TiktokenTokenizer.from_dir(k2_dir, eos="<|nope|>")


def test_long_runs_are_cut_as_k2_does(k2_dir, reference):
    tok = TiktokenTokenizer.from_dir(k2_dir)

    def ref(*pieces):
        return [i for p in pieces for i in reference.encode_ordinary(p)]

    text = "x" + "th" * 30_000  # a cut falls between a "t" and its "h": other ids than uncut
    assert tok.encode(text).tolist() == ref(text[:25_000], text[25_000:50_000], text[50_000:]) != ref(text)
    assert tok.encode("a " + "\t" * 25_001 + "#").tolist() == ref("a " + "\t" * 24_999, "\t" * 2 + "#")
    text = "the " * 120_000  # over 400,000 characters: encoded 400,000 at a time
    assert tok.encode(text).tolist() == ref(text[:400_000], text[400_000:])


def test_save_load_and_discovery(tmp_path, k2_dir):
    tok = TiktokenTokenizer.from_dir(k2_dir, eos="<|im_end|>")
    tok.save(tmp_path / "saved")
    for name in ("tiktoken.model", "tokenizer_config.json"):
        assert (tmp_path / "saved" / name).read_bytes() == (k2_dir / name).read_bytes()
    again = tokenizer_lib.load(tmp_path / "saved")
    assert isinstance(again, TiktokenTokenizer) and again.pat_str == tok.pat_str
    assert (again.vocab_size, again.bos_id, again.eos_id, again.pad_id) == (
        tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (N_RANKS + 256, N_RANKS, N_RANKS + 2, N_RANKS + 2)
    for text in TEXTS:
        np.testing.assert_array_equal(again.encode(text), tok.encode(text))

    plain = TiktokenTokenizer.from_dir(k2_dir)
    for spec in (k2_dir, k2_dir / "tiktoken.model", tmp_path / "saved"):
        found = tokenizer_lib.from_spec(str(spec))
        assert found.kind == "tiktoken"
        np.testing.assert_array_equal(found.encode(TEXTS[3]), plain.encode(TEXTS[3]))
    assert tokenizer_lib.from_spec(str(k2_dir / "tiktoken.model"), eos="<|im_end|>").eos_id == N_RANKS + 2

    assert tokenizer_lib.from_hf_dir(k2_dir).kind == "tiktoken"
    hf_dir = tmp_path / "hf"
    shutil.copytree(k2_dir, hf_dir)
    BPETokenizer.train([TRAIN], 300).save(tmp_path / "bpe")
    shutil.copy(tmp_path / "bpe" / "tokenizer.json", hf_dir)
    assert tokenizer_lib.from_hf_dir(hf_dir).kind == "hf"  # tokenizer.json before tiktoken.model
    ByteTokenizer().save(hf_dir / "tokenizer")
    assert tokenizer_lib.from_hf_dir(hf_dir).kind == "byte"  # a k2jax-saved tokenizer/ first of all
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty has no tokenizer.*tokenizer\.json, tiktoken\.model"):
        tokenizer_lib.from_hf_dir(tmp_path / "empty")


def test_errors_name_the_file(tmp_path, k2_dir):
    lines = (k2_dir / "tiktoken.model").read_text().splitlines()
    for n, bad in ((300, "not-base64-and-no-rank"), (12, "YWI= twelve"), (5, "YWI 5")):
        broken = tmp_path / f"broken{n}"
        shutil.copytree(k2_dir, broken)
        (broken / "tiktoken.model").write_text("\n".join(lines[:n - 1] + [bad] + lines[n:]) + "\n")
        with pytest.raises(ValueError, match=rf"broken{n}/tiktoken\.model, line {n}: expected"):
            TiktokenTokenizer.from_dir(broken)

    (tmp_path / "no_config").mkdir()
    shutil.copy(k2_dir / "tiktoken.model", tmp_path / "no_config")
    with pytest.raises(ValueError, match=r"no_config/tokenizer_config\.json not found"):
        TiktokenTokenizer.from_dir(tmp_path / "no_config")
    with pytest.raises(ValueError, match=r"no_config/tokenizer_config\.json not found"):
        tokenizer_lib.from_spec(str(tmp_path / "no_config" / "tiktoken.model"))

    config = json.loads((k2_dir / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (k2_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: no eos_token"):
        TiktokenTokenizer.from_dir(k2_dir)
    assert TiktokenTokenizer.from_dir(k2_dir, eos="[EOS]").eos_id == N_RANKS + 1
