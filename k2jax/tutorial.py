"""Run sizes for the Colab notebooks (colab/), picked to fit the runtime they run on.

The size follows `jax.default_backend()` (cpu: minutes on Colab's two vCPUs; gpu / tpu:
more steps and bigger batches), unless K2JAX_TUTORIAL_SIZE names one; the test suite sets
it to `tiny` so every notebook runs top to bottom in seconds.
"""

from __future__ import annotations

import dataclasses
import os

import jax

ENV = "K2JAX_TUTORIAL_SIZE"


@dataclasses.dataclass(frozen=True)
class TutorialSize:
    name: str
    preset: str
    steps: int
    batch_size: int
    seq_len: int
    eval_every: int
    corpus_bytes: int
    sample_tokens: int

    def overrides(self, out_dir: str, *extra: str) -> list[str]:
        """`--set`-style overrides of a run of this size writing to `out_dir` (extra ones win)."""
        return [f"model.preset={self.preset}", f"train.steps={self.steps}", f"train.batch_size={self.batch_size}",
                f"data.seq_len={self.seq_len}", f"data.max_corpus_bytes={self.corpus_bytes}",
                f"train.eval_every={self.eval_every}", "train.eval_batches=2", f"train.log_every={self.eval_every}",
                f"checkpoint.every={self.eval_every * 2}", "checkpoint.async_save=false", f"train.out_dir={out_dir}",
                *extra]


SIZES = {
    "tiny": TutorialSize("tiny", "tiny", steps=8, batch_size=8, seq_len=64, eval_every=2, corpus_bytes=300_000,
                         sample_tokens=16),
    "cpu": TutorialSize("cpu", "small", steps=200, batch_size=16, seq_len=128, eval_every=20,
                        corpus_bytes=4_000_000, sample_tokens=160),
    "gpu": TutorialSize("gpu", "small", steps=600, batch_size=64, seq_len=256, eval_every=50,
                        corpus_bytes=8_000_000, sample_tokens=240),
    "tpu": TutorialSize("tpu", "small", steps=600, batch_size=64, seq_len=256, eval_every=50,
                        corpus_bytes=8_000_000, sample_tokens=240),
}


def size(name: str | None = None) -> TutorialSize:
    """The size named, else $K2JAX_TUTORIAL_SIZE, else the one for this backend."""
    name = name or os.environ.get(ENV) or jax.default_backend()
    if name not in SIZES:
        raise ValueError(f"tutorial size {name!r}: expected one of {', '.join(SIZES)} (set {ENV})")
    return SIZES[name]
