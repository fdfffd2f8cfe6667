"""An evaluation suite: text sets and tasks read and tokenized once, scored on a model at each `run`.

Results are keyed by set or task name: {"heldout": {"bpb", "nats", "tokens", "bytes", "documents"},
"stdlib_mc": {"acc", "acc_norm", "items"}, "stdlib_qa": {"em", "items", "predictions"}}; `metrics`
flattens them for metrics.jsonl as eval/bpb/NAME, eval/TASK/acc, eval/TASK/acc_norm, eval/TASK/em.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from k2jax.config import ConfigError
from k2jax.eval import sources
from k2jax.eval.bpb import TextSet
from k2jax.eval.choice import ChoiceTask
from k2jax.eval.qa import Generate, score_qa
from k2jax.eval.scoring import ModelParts

TASK_METRICS = ("acc", "acc_norm", "em")


@dataclasses.dataclass(frozen=True)
class Suite:
    seq_len: int  # T of the scored rows
    text_sets: list[TextSet]
    choice_tasks: list[ChoiceTask]
    qa_tasks: dict[str, list[dict]]  # name -> items

    @classmethod
    def build(cls, tokenizer, seq_len: int, *, texts: list[str], tasks: list[str], heldout: list[str] | None,
              max_bytes: int | None = None, max_items: int | None = None, where: tuple[str, str]) -> "Suite":
        """texts: "heldout" / NAME=PATH specs; tasks: names or paths; heldout: the run's held-out documents
        (None where unknown); where: how the caller names the two lists in errors (e.g. --text, --tasks)."""
        text_sets, choice_tasks, qa_tasks = [], [], {}
        for spec in texts:
            name, path = sources.split_text_spec(spec, where[0])
            if path is None and heldout is None:
                raise ConfigError(f"{where[0]}: 'heldout' needs the run's held-out text, which a prepared corpus "
                                  f"keeps only as token ids; name a text set as NAME=PATH instead")
            docs = sources.within_bytes(heldout if path is None else sources.read_texts(path, where[0]), max_bytes)
            text_sets.append(TextSet.build(name, tokenizer, docs, seq_len))
        for spec in tasks:
            name, kind, items = sources.load_task(spec, where[1], max_items)
            if kind == "qa":
                qa_tasks[name] = items
                continue
            try:
                choice_tasks.append(ChoiceTask.build(name, tokenizer, items, seq_len))
            except ValueError as e:
                raise ConfigError(f"{where[1]}: {e}") from None
        names = [s.name for s in text_sets] + [t.name for t in choice_tasks] + list(qa_tasks)
        if len(set(names)) != len(names):
            raise ConfigError(f"{where[0]}, {where[1]}: names must differ, got {names}")
        return cls(seq_len, text_sets, choice_tasks, qa_tasks)

    def run(self, parts: ModelParts, batch_size: int, generate: Generate | None = None) -> dict[str, dict]:
        """Every set's and task's results; QA tasks need `generate` (greedy answers of prompts)."""
        results = {s.name: s.score(parts, batch_size, self.seq_len) for s in self.text_sets}
        results.update({t.name: t.score(parts, batch_size, self.seq_len) for t in self.choice_tasks})
        if self.qa_tasks and generate is None:
            raise ValueError(f"QA tasks {sorted(self.qa_tasks)} need a generate function")
        results.update({name: score_qa(items, generate) for name, items in self.qa_tasks.items()})
        return results


def metrics(results: dict[str, dict]) -> dict[str, float]:
    """eval/bpb/NAME and eval/TASK/METRIC for metrics.jsonl, TensorBoard, summary.json and results.csv."""
    out = {}
    for name, r in results.items():
        if "bpb" in r:
            out[f"eval/bpb/{name}"] = r["bpb"]
        out.update({f"eval/{name}/{m}": r[m] for m in TASK_METRICS if m in r})
    return out


def format_table(results: dict[str, dict]) -> str:
    lines = [f"{'set / task':24s} {'metric':9s} {'value':>8s}  over"]
    for name, r in results.items():
        over = f"{r['bytes']:,} bytes" if "bytes" in r else f"{r['items']:,} items"
        for metric in ("bpb", *TASK_METRICS):
            if metric in r:
                lines.append(f"{name:24s} {metric:9s} {r[metric]:8.4f}  {over}")
    return "\n".join(lines)


def write_results(path: Path, step: int, results: dict[str, dict]) -> dict:
    """Merge `results` into the JSON at `path` ({"step", "results", "metrics"}; earlier results of other sets
    and tasks kept), written atomically (a temporary file renamed over it). Returns what was written."""
    merged = json.loads(path.read_text())["results"] if path.is_file() else {}
    merged.update(results)
    payload = {"step": step, "results": merged, "metrics": metrics(merged)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return payload
