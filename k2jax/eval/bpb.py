"""Bits per byte of a text set: sum over its tokens of -ln p (nats) / (ln 2 x its UTF-8 bytes).

Tokenizer independent: the denominator is the text's bytes, not its tokens, so byte-level and BPE runs
compare. A document is scored as [bos, t_1 .. t_n] (no eos: it has no bytes) cut into disjoint windows of
T = data.seq_len predictions, as training cuts it: t_1 is predicted from bos, and the first token of every
later window from the last token of the window before (lm-eval-harness's rolling windows with a context of
one token). Every token, hence every byte, is predicted exactly once.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from k2jax.data.pipeline import chunk_starts
from k2jax.eval.scoring import ModelParts, Span, span_logprobs


def windows(tokenizer, text: str, seq_len: int) -> list[Span]:
    """The document's windows: spans of at most seq_len predictions, all scored."""
    ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(text)]).astype(np.int32)
    return [Span(ids[s:s + seq_len + 1]) for s in chunk_starts(len(ids), seq_len)]


@dataclasses.dataclass(frozen=True)
class TextSet:
    """A named set of documents, tokenized into windows once."""

    name: str
    spans: list[Span]
    bytes: int  # UTF-8 bytes of the documents
    documents: int

    @classmethod
    def build(cls, name: str, tokenizer, texts: list[str], seq_len: int) -> "TextSet":
        spans = [w for text in texts for w in windows(tokenizer, text, seq_len)]
        return cls(name, spans, sum(len(t.encode("utf-8")) for t in texts), len(texts))

    def score(self, parts: ModelParts, batch_size: int, seq_len: int) -> dict:
        """{"bpb", "nats", "tokens", "bytes", "documents"}."""
        nats = -float(span_logprobs(parts, self.spans, batch_size, seq_len).sum())
        tokens = sum(len(s.ids) - 1 for s in self.spans)
        return {"bpb": nats / (math.log(2) * self.bytes), "nats": nats, "tokens": tokens, "bytes": self.bytes,
                "documents": self.documents}
