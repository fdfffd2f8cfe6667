"""A logged step's record, written to JSONL and TensorBoard, and the end-of-run PNG of loss and max logits.

The training loop builds each logged step's record from `step_record` (its metrics, `Throughput`'s
tokens/s and MFU) and, for a data mixture, `source_record`. One JSON object per logged step in
metrics.jsonl ("step" plus the metrics; nested dicts and lists kept, non-finite numbers written as
null). Every scalar, and every element of a list, also goes to TensorBoard under tb/.
`plot_run` reads "loss", "eval_loss", "max_logit_per_layer" (a list, one
value per layer in model order), the expert loads and the `eval` section's
"eval/bpb/NAME" and "eval/TASK/acc" / "acc_norm".
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from pathlib import Path

import jax
import numpy as np

from k2jax.config import Config
from k2jax.model import flops as flops_lib
from k2jax.parallel import distributed


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
    """metrics.jsonl and TensorBoard's events file, written here, in the caller's thread (tensorboardX's
    SummaryWriter thread ends at a write error, a full disk, after which add_scalar blocks forever).

    A write that fails (a full disk: OSError) raises and leaves each file ending in whole records: what the
    step got onto the disk is cut back off, so a resumed run appends after whole lines."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _WholeRecords(self.path)
        self._tb = None
        if tensorboard:
            from tensorboardX.proto.event_pb2 import Event

            (Path(out_dir) / "tb").mkdir(exist_ok=True)
            now = time.time()  # the file name and first event of tensorboardX's EventsWriter
            self._tb = _WholeRecords(Path(out_dir) / "tb" / f"events.out.tfevents.{int(now)}.{socket.gethostname()}",
                                     sync=True)
            self._tb.write(_tf_record(Event(wall_time=now, file_version="brain.Event:2").SerializeToString()))

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": int(step), **_plain(metrics)}
        self._file.write((json.dumps(record) + "\n").encode())
        if self._tb is not None:
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.summary import scalar

            now = time.time()
            self._tb.write(b"".join(
                _tf_record(Event(wall_time=now, step=int(step), summary=scalar(name.lstrip("/"), value))
                           .SerializeToString())
                for name, value in _scalars("", {k: v for k, v in record.items() if k != "step"})))

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            if self._tb is not None:
                self._tb.close()


class _WholeRecords:
    """An append-only file written a whole record (one step's bytes) at a time, unbuffered: a write the OS refuses
    part-way is cut back off (truncating releases space even on a full disk) and raises."""

    def __init__(self, path: Path, sync: bool = False):
        self.path, self._sync, self._fd = path, sync, None
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, data: bytes) -> None:
        size = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            if self._sync:
                os.fsync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                pass
            if e.filename is None:
                e.filename = str(self.path)
            raise

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    __del__ = close  # as a file object closes when dropped


def _tf_record(data: bytes) -> bytes:
    """One TFRecord (the events file's framing): length, its masked CRC-32C, the data, its masked CRC-32C."""
    from tensorboardX.record_writer import masked_crc32c

    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def step_record(host: dict, tokens_per_s: float, flops_per_token: float, peak) -> dict:
    """A logged step's train metrics (host: as Python values), its tokens/s and, where the device's peak FLOP/s
    is known, MFU."""
    record = {
        "loss": host["loss"], "grad_norm": host["grad_norm"], "learning_rate": host["learning_rate"],
        "tokens_per_s": tokens_per_s,
        **host["stats"].log(),  # every logged ForwardStats field (k2jax.model.stats)
        **{k: host[k] for k in ("clipped_heads", "min_gamma") if k in host},
    }
    if peak:
        record["mfu"] = flops_lib.mfu(tokens_per_s, flops_per_token, jax.device_count(), peak)
    return record


def source_record(cfg: Config, train) -> dict:
    """data/tokens/NAME and data/epochs/NAME of a mixture.MixtureIterator: tokens trained on so far per source,
    over all processes (a collective: every process calls it at the same steps), and what they are in passes
    over its train split."""
    per_process = distributed.allgather_json({"tokens": train.tokens.tolist(), "pairs": train.pairs})
    tokens = np.sum([p["tokens"] for p in per_process], axis=0)
    pairs = np.sum([p["pairs"] for p in per_process], axis=0)
    record = {}
    for source, seen, total in zip(cfg.data.sources, tokens, pairs):
        record[f"data/tokens/{source.label}"] = int(seen)
        record[f"data/epochs/{source.label}"] = float(seen / max(total, 1))
    return record


class Throughput:
    """Tokens per second and seconds per step over a window of steps."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.tokens, self.steps, self.start = 0.0, 0, time.perf_counter()

    def count(self, tokens: int) -> None:
        self.tokens += tokens
        self.steps += 1

    def measure(self) -> tuple[float, float]:
        """(tokens/s, s/step) over the window, which restarts."""
        elapsed = time.perf_counter() - self.start
        rates = self.tokens / max(elapsed, 1e-9), elapsed / max(self.steps, 1)
        self.restart()
        return rates


class LoadMonitor:
    """Watches each MoE layer's max/mean expert load over logged steps.

    `update` returns a warning when a layer has stayed above `limit` x its mean load for
    `patience` steps (once per such stretch); `settled()` is the worst layer's mean max/mean
    load over the steps logged after `settle` (or over the second half of a shorter run).
    """

    def __init__(self, total_steps: int, limit: float = 3.0, patience: int = 50, settle: int = 50):
        self.limit, self.patience = limit, patience
        self.settle = min(settle, total_steps // 2)
        self._above_since: dict[int, int] = {}
        self._warned: set[int] = set()
        self._sums: list[float] = []
        self._count = 0

    def update(self, step: int, max_per_layer: list[float]) -> list[str]:
        warnings = []
        for layer, ratio in enumerate(max_per_layer):
            if ratio <= self.limit:
                self._above_since.pop(layer, None)
                self._warned.discard(layer)
                continue
            since = self._above_since.setdefault(layer, step)
            if step - since >= self.patience and layer not in self._warned:
                self._warned.add(layer)
                warnings.append(f"warning: MoE layer {layer} has sent over {self.limit:g}x the mean load to one "
                                f"expert since step {since} (now {ratio:.1f}x): routing is collapsing; see "
                                f"expert_load_max_per_layer in metrics.jsonl and model.moe.router_balance")
        if step > self.settle:
            if not self._sums:
                self._sums = [0.0] * len(max_per_layer)
            self._sums = [a + b for a, b in zip(self._sums, max_per_layer)]
            self._count += 1
        return warnings

    def settled(self) -> float | None:
        """Worst layer's mean max/mean load after settling (None if nothing was logged then)."""
        return max(s / self._count for s in self._sums) if self._count else None


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(metrics_jsonl: str | Path, png_path: str | Path, tau: float | None = None) -> None:
    """Panels: train/eval loss; per-layer max attention logit (tau dashed); for MoE models, each MoE
    layer's max/mean (solid) and min/mean (dashed) expert load, and where a bounded expert exchange dropped
    token copies, each MoE layer's dropped share; with an `eval` section, bits per byte
    per text set and each task's acc (solid) and acc_norm (dashed); with data.sources, the epochs trained on each
    source; all over steps."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    records = {r["step"]: r for r in read_metrics(metrics_jsonl)}  # a resumed run re-logs steps: keep the last
    steps = sorted(records)
    loads = [(s, records[s]["expert_load_max_per_layer"], records[s]["expert_load_min_per_layer"])
             for s in steps if records[s].get("expert_load_max_per_layer")]
    evals = sorted({k for r in records.values() for k in r if k.startswith("eval/")})
    bpb, tasks = [k for k in evals if k.startswith("eval/bpb/")], [k for k in evals if k.endswith("/acc")]
    epochs = sorted({k for r in records.values() for k in r if k.startswith("data/epochs/")})
    drops = [(s, records[s]["dropped_fraction_per_layer"]) for s in steps
             if records[s].get("dropped_fraction_per_layer")]
    dropping = any(max(v) > 0 for _, v in drops)  # a dropless run has nothing to show
    extra = [bool(loads), dropping, bool(bpb), bool(tasks), bool(epochs)]
    fig = Figure(figsize=(5.5 * (2 + sum(extra)), 4))
    ax_loss, ax_logit, *more = fig.subplots(1, 2 + sum(extra))
    ax_load, ax_drop, ax_bpb, ax_tasks, ax_epochs = (more.pop(0) if shown else None for shown in extra)
    train = [(s, records[s]["loss"]) for s in steps if records[s].get("loss") is not None]
    evals = [(s, records[s]["eval_loss"]) for s in steps if records[s].get("eval_loss") is not None]
    if train:
        ax_loss.plot(*zip(*train), label="train")
    if evals:
        ax_loss.plot(*zip(*evals), "o-", label="held-out")
    ax_loss.set(title="Loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax_loss.legend()
    _plot_per_layer(ax_logit, [(s, records[s]["max_logit_per_layer"]) for s in steps
                               if records[s].get("max_logit_per_layer")], "layer")
    if tau is not None:
        ax_logit.axhline(tau, linestyle="--", color="k", label=f"tau = {tau:g}")
    ax_logit.set(title="Max attention logit per layer", xlabel="step", ylabel="max pre-softmax logit")
    ax_logit.legend(fontsize="small")
    if loads:
        _plot_loads(ax_load, loads)
    if dropping:
        _plot_per_layer(ax_drop, [(s, [100 * v for v in values]) for s, values in drops], "MoE layer")
        ax_drop.set(title="Token copies dropped by the expert exchange", xlabel="step", ylabel="% of copies")
        ax_drop.legend(fontsize="small")
    if bpb:
        for key in bpb:
            ax_bpb.plot(*_series(records, steps, key), "o-", label=key.removeprefix("eval/bpb/"))
        ax_bpb.set(title="Bits per byte", xlabel="step", ylabel="bits per UTF-8 byte")
        ax_bpb.legend(fontsize="small")
    if tasks:
        for key in tasks:
            line, = ax_tasks.plot(*_series(records, steps, key), "o-", label=key.split("/")[1])
            ax_tasks.plot(*_series(records, steps, key + "_norm"), "--", color=line.get_color())
        ax_tasks.set(title="Task accuracy (acc solid, acc_norm dashed)", xlabel="step", ylabel="accuracy")
        ax_tasks.legend(fontsize="small")
    if epochs:
        for key in epochs:
            ax_epochs.plot(*_series(records, steps, key), label=key.removeprefix("data/epochs/"))
        ax_epochs.set(title="Data mixture: passes over each source", xlabel="step", ylabel="epochs trained")
        ax_epochs.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def _plot_per_layer(ax, points: list[tuple[int, list[float]]], label: str) -> None:
    """One line per layer of (step, per-layer values) points."""
    if not points:
        return
    values = np.asarray([v for _, v in points], dtype=float)  # (steps, layers)
    for layer in range(values.shape[1]):
        ax.plot([s for s, _ in points], values[:, layer], label=f"{label} {layer}")


def _series(records: dict, steps: list[int], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records holding a value for `key`."""
    points = [(s, records[s][key]) for s in steps if records[s].get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def _plot_loads(ax, loads) -> None:
    xs = [s for s, _, _ in loads]
    high = np.asarray([h for _, h, _ in loads], dtype=float)
    low = np.asarray([m for _, _, m in loads], dtype=float)
    for layer in range(high.shape[1]):
        line, = ax.plot(xs, high[:, layer], label=f"MoE layer {layer}")
        ax.plot(xs, low[:, layer], "--", color=line.get_color())
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set(title="Expert load / mean (max solid, min dashed)", xlabel="step", ylabel="tokens / mean tokens")
    ax.legend(fontsize="small")
