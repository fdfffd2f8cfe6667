"""Metrics to JSONL and TensorBoard, and the end-of-run PNG of loss and max logits.

One JSON object per logged step in metrics.jsonl ("step" plus the metrics;
nested dicts and lists kept, non-finite numbers written as null). Every
scalar, and every element of a list, also goes to TensorBoard under tb/.
`plot_run` reads "loss", "eval_loss" and "max_logit_per_layer" (a list, one
value per layer in model order).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def _plain(value):
    """JSON-safe copy: numpy/jax scalars and arrays to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(np.asarray(value).tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scalars(prefix: str, value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _scalars(f"{prefix}/{k}", v)
    elif isinstance(value, list):
        flat = np.asarray(value, dtype=float).reshape(-1) if value and not isinstance(value[0], dict) else []
        for i, v in enumerate(flat):
            yield f"{prefix}/{i}", float(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
        yield prefix, float(value)


class MetricsWriter:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(out_dir) / "tb"))

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": int(step), **_plain(metrics)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in _scalars("", {k: v for k, v in record.items() if k != "step"}):
                self._tb.add_scalar(name.lstrip("/"), value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(metrics_jsonl: str | Path, png_path: str | Path, tau: float | None = None) -> None:
    """Two panels: train/eval loss over steps; per-layer max attention logit over steps (tau dashed)."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    records = {r["step"]: r for r in read_metrics(metrics_jsonl)}  # a resumed run re-logs steps: keep the last
    steps = sorted(records)
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_logit = fig.subplots(1, 2)
    train = [(s, records[s]["loss"]) for s in steps if records[s].get("loss") is not None]
    evals = [(s, records[s]["eval_loss"]) for s in steps if records[s].get("eval_loss") is not None]
    if train:
        ax_loss.plot(*zip(*train), label="train")
    if evals:
        ax_loss.plot(*zip(*evals), "o-", label="held-out")
    ax_loss.set(title="Loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax_loss.legend()
    per_layer = [(s, records[s]["max_logit_per_layer"]) for s in steps if records[s].get("max_logit_per_layer")]
    if per_layer:
        xs = [s for s, _ in per_layer]
        values = np.asarray([v for _, v in per_layer], dtype=float)
        for layer in range(values.shape[1]):
            ax_logit.plot(xs, values[:, layer], label=f"layer {layer}")
    if tau is not None:
        ax_logit.axhline(tau, linestyle="--", color="k", label=f"tau = {tau:g}")
    ax_logit.set(title="Max attention logit per layer", xlabel="step", ylabel="max pre-softmax logit")
    ax_logit.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
