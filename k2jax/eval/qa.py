"""Generative exact-match QA: a greedy answer, compared with the references after normalisation.

An item is {"question": str, "answers": [str, ...]} and optionally "prompt": the model is given
`prompt` if present, else "Question: {question}\\nAnswer:". The answer is the greedy continuation up to
the first newline (at most `MAX_ANSWER_TOKENS` tokens). It matches when its normalised form equals a
reference's: SQuAD's normalize_answer (lowercase, punctuation removed, the articles a/an/the removed,
whitespace runs collapsed and stripped). em: the share of items whose answer matches one reference.
"""

from __future__ import annotations

import re
import string
from typing import Callable

MAX_ANSWER_TOKENS = 32
Generate = Callable[[list[str]], list[str]]  # prompts -> greedy answers (stop string excluded)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower, drop punctuation, drop articles, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def prompt_of(item: dict) -> str:
    return item.get("prompt", f"Question: {item['question']}\nAnswer:")


def exact_match(prediction: str, answers: list[str]) -> bool:
    return any(normalize_answer(prediction) == normalize_answer(a) for a in answers)


def score_qa(items: list[dict], generate: Generate) -> dict:
    """{"em", "items", "predictions"} of the items' greedy answers from `generate`."""
    predictions = generate([prompt_of(item) for item in items])
    if len(predictions) != len(items):
        raise ValueError(f"generate returned {len(predictions)} answers for {len(items)} prompts")
    hits = [exact_match(p, item["answers"]) for p, item in zip(predictions, items)]
    return {"em": sum(hits) / max(len(items), 1), "items": len(items), "predictions": predictions}


def engine_generate(model, tokenizer, max_batch: int = 16) -> Generate:
    """Greedy answers from the KV-cached engine (k2jax.inference), stopped at a newline."""
    from k2jax.inference.engine import Engine, SamplingParams

    engine = Engine(model, tokenizer, max_batch=max_batch)
    params = SamplingParams(max_tokens=MAX_ANSWER_TOKENS, temperature=0.0, stop=("\n",))
    return lambda prompts: [c.text for c in engine.generate(prompts, params)]
