"""Multiple-choice log-likelihood tasks, scored as lm-eval-harness scores them.

An item is {"context": str, "choices": [str, ...], "gold": int}. Each choice is the continuation of
the context: as lm-eval-harness's `_encode_pair`, trailing whitespace of the context moves to the front
of the continuation, context + continuation is encoded whole and the continuation is the tokens past
the context's own encoding (a BPE merge across the boundary stays with the continuation). The model
reads [bos, context tokens, continuation tokens] (at most T = data.seq_len predictions: a longer
context loses its first tokens, lm-eval-harness's left truncation) and the log-probabilities of the
continuation tokens are summed.

acc: the argmax of the summed log-probabilities is the gold choice. acc_norm: the argmax of the sum
divided by the choice's length in characters, len(choice) as lm-eval-harness's `completion_len` (equal
to the byte length for ASCII text). Ties go to the first choice (numpy's argmax).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from k2jax.eval.scoring import ModelParts, Span, span_logprobs


def continuation_span(tokenizer, context: str, choice: str, seq_len: int) -> Span:
    """The span that scores `choice` after `context`; ValueError if the continuation alone fills the row."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, choice = context[:-spaces], context[-spaces:] + choice
    context_ids = tokenizer.encode(context)
    continuation = tokenizer.encode(context + choice)[len(context_ids):]
    if not 0 < len(continuation) < seq_len:
        raise ValueError(f"the choice {choice!r} is {len(continuation)} tokens; scoring needs 1 to "
                         f"{seq_len - 1} (data.seq_len - 1)")
    ids = np.concatenate([[tokenizer.bos_id], context_ids, continuation]).astype(np.int32)[-(seq_len + 1):]
    return Span(ids, scored_from=len(ids) - 1 - len(continuation))


@dataclasses.dataclass(frozen=True)
class ChoiceTask:
    """A named multiple-choice task, tokenized once: one span per (item, choice)."""

    name: str
    spans: list[Span]
    choices: list[list[str]]  # per item
    gold: np.ndarray  # (items,) int

    @classmethod
    def build(cls, name: str, tokenizer, items: list[dict], seq_len: int) -> "ChoiceTask":
        spans = []
        for i, item in enumerate(items):
            try:
                spans.extend(continuation_span(tokenizer, item["context"], c, seq_len) for c in item["choices"])
            except ValueError as e:
                raise ValueError(f"task {name}, item {i + 1}: {e}") from None
        return cls(name, spans, [item["choices"] for item in items], np.asarray([item["gold"] for item in items]))

    def loglikelihoods(self, parts: ModelParts, batch_size: int, seq_len: int) -> list[np.ndarray]:
        """Per item, float64 (choices,): the summed log-probability of each choice."""
        ll = span_logprobs(parts, self.spans, batch_size, seq_len)
        ends = np.cumsum([len(c) for c in self.choices])
        return np.split(ll, ends[:-1])

    def score(self, parts: ModelParts, batch_size: int, seq_len: int) -> dict:
        """{"acc", "acc_norm", "items"}."""
        lls = self.loglikelihoods(parts, batch_size, seq_len)
        return accuracy(lls, self.choices, self.gold)


def accuracy(lls: list[np.ndarray], choices: list[list[str]], gold: np.ndarray) -> dict:
    """acc and acc_norm (module docstring) of per-item choice log-likelihoods."""
    pred = np.asarray([np.argmax(ll) for ll in lls])
    pred_norm = np.asarray([np.argmax(ll / np.asarray([float(len(c)) for c in cs])) for ll, cs in zip(lls, choices)])
    return {"acc": float(np.mean(pred == gold)), "acc_norm": float(np.mean(pred_norm == gold)), "items": len(gold)}
