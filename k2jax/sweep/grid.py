"""Sweeps: a base config and the axes to vary, run one after another into one results table.

A sweep file (experiments/sweeps/*.yaml):

    name: optimizer
    base: experiments/ablation_cpu.yaml      # relative to the repository or the sweep file
    out_dir: runs/sweeps/optimizer
    set: {train.steps: 300}                  # fixed overrides for every run
    exclude: [{optim.name: adamw, size: d128}]  # combinations the grid skips (optional)
    grid:                                    # the cartesian product of the axes
      optim.name: [muon, adamw]              # a config key -> its values
      size:                                  # any other name -> named bundles of overrides
        d64: {model.d_model: 64, model.attention.num_heads: 2}
        d128: {model.d_model: 128, model.attention.num_heads: 4}

Each run trains into out_dir/RUN (RUN joins the axis values); a run with a
summary.json is finished and skipped, one with checkpoints but no summary, or a
summary saying it was preempted, is resumed. A preempted run stops the sweep
(Preempted); rerunning the sweep resumes it. results.csv gets one row per
finished run, with a column per `eval` section result (eval/bpb/NAME,
eval/TASK/acc, ...: the values of the run's last step) after RESULT_FIELDS.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import shlex
from pathlib import Path

from k2jax.config import Config, ConfigError, load_config, read_yaml
from k2jax.model import flops as flops_lib
from k2jax.train.checkpoint import finished_steps

RESULT_FIELDS = ("run", "params_total", "params_activated", "tokens", "flops", "attention_flops", "final_loss",
                 "final_eval_loss", "best_eval_loss", "max_logit", "expert_load_max_mean", "wall_time_s", "steps",
                 "diverged_at")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    axes: dict  # axis -> the value (or bundle name) this run takes
    overrides: tuple[str, ...]  # --set strings, fixed ones first


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    base: Path
    out_dir: Path
    runs: tuple[Run, ...]

    def config(self, run: Run) -> Config:
        return load_config(self.base, [*run.overrides, f"train.out_dir={self.out_dir / run.name}",
                                       "train.progress=false"])


def _override(key: str, value) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def _token(value) -> str:
    return str(value).replace("/", "_").replace(" ", "")


def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file; every run's config is checked before anything trains."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    raw = read_yaml(path) or {}
    unknown = set(raw) - {"name", "base", "out_dir", "set", "grid", "exclude"}
    if unknown:
        raise ConfigError(f"sweep {path}: unknown keys {sorted(unknown)} "
                          f"(allowed: name, base, out_dir, set, grid, exclude)")
    for key in ("name", "base", "grid"):
        if key not in raw:
            raise ConfigError(f"sweep {path}: missing '{key}'")
    base = Path(raw["base"])
    if not base.is_file() and (path.parent / base).is_file():
        base = path.parent / base
    fixed = [_override(k, v) for k, v in (raw.get("set") or {}).items()]
    axes = []
    for axis, values in raw["grid"].items():
        if isinstance(values, dict):  # named bundles of overrides
            axes.append([(axis, name, [_override(k, v) for k, v in bundle.items()])
                         for name, bundle in values.items()])
        elif isinstance(values, list) and values:
            axes.append([(axis, v, [_override(axis, v)]) for v in values])
        else:
            raise ConfigError(f"sweep {path}: grid.{axis} must be a non-empty list of values or a mapping "
                              f"of named override bundles")
    exclude = _exclusions(path, raw.get("exclude") or [], raw["grid"])
    runs = []
    for combo in itertools.product(*axes):
        if any(all(v == rule[axis] for axis, v, _ in combo if axis in rule) for rule in exclude):
            continue
        name = "-".join(f"{axis.split('.')[-1]}={_token(v)}" for axis, v, _ in combo)
        overrides = tuple(fixed + [o for _, _, sets in combo for o in sets])
        runs.append(Run(name, {axis: v for axis, v, _ in combo}, overrides))
    sweep = Sweep(raw["name"], base, Path(raw.get("out_dir", f"runs/sweeps/{raw['name']}")), tuple(runs))
    for run in runs:
        try:
            sweep.config(run)
        except ConfigError as e:
            raise ConfigError(f"sweep {path}, run {run.name}: {e}") from e
    return sweep


def _exclusions(path: Path, rules, grid: dict) -> list[dict]:
    """`exclude`: a list of {axis: value (or bundle name)} combinations the grid skips."""
    if not isinstance(rules, list) or not all(isinstance(r, dict) and r for r in rules):
        raise ConfigError(f"sweep {path}: exclude must be a list of {{axis: value}} mappings")
    for rule in rules:
        for axis, value in rule.items():
            values = list(grid.get(axis) or [])
            if value not in values:
                raise ConfigError(f"sweep {path}: exclude names {axis}={value!r}, which is not in the grid "
                                  f"({axis}: {values if axis in grid else 'no such axis'})")
    return rules


def launch_commands(sweep: Sweep, extra: str = "") -> list[str]:
    """One `k2jax train` command per run, e.g. to launch on TPU VMs (extra: flags such as --distributed auto)."""
    cmds = []
    for run in sweep.runs:
        sets = " ".join(f"--set {shlex.quote(o)}" for o in run.overrides)
        cmds.append(f"k2jax train {shlex.quote(str(sweep.base))} {sets} "
                    f"--set train.out_dir={shlex.quote(str(sweep.out_dir / run.name))} {extra}".strip())
    return cmds


def result_row(sweep: Sweep, run: Run) -> dict | None:
    """The results-table row of a finished run (None if it has not finished)."""
    out = sweep.out_dir / run.name
    if not (out / "summary.json").is_file():
        return None
    summary = json.loads((out / "summary.json").read_text())
    cfg = sweep.config(run)
    counts = flops_lib.analytic_param_counts(cfg.model)
    tokens = summary["steps"] * cfg.train.batch_size * cfg.data.seq_len
    per_token = flops_lib.flops_per_token(cfg.model, cfg.data.seq_len)
    return {"run": run.name, **run.axes, "params_total": counts["total"], "params_activated": counts["activated"],
            "tokens": tokens, "flops": tokens * per_token["total"], "attention_flops": tokens * per_token["attention"],
            "final_loss": summary.get("final_loss"), "final_eval_loss": summary.get("final_eval_loss"),
            "best_eval_loss": summary.get("best_eval_loss"), "max_logit": summary.get("max_logit"),
            "expert_load_max_mean": summary.get("expert_load_max_mean"),
            "wall_time_s": summary.get("wall_time_s"), "steps": summary["steps"],
            "diverged_at": summary.get("diverged_at"), **{k: v for k, v in summary.items() if k.startswith("eval/")}}


def finished(run_dir: Path) -> bool:
    """Whether a run directory holds a finished run: a readable summary.json without `preempted_at`."""
    try:
        return "preempted_at" not in json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False


def run_dirs(sweep: Sweep) -> list[Path]:
    """The run directories of the sweep that exist."""
    return [sweep.out_dir / run.name for run in sweep.runs if (sweep.out_dir / run.name).is_dir()]


def write_results(sweep: Sweep) -> Path:
    """results.csv with a row per finished run (rewritten whole, so it is never half-updated). A run that
    has not finished here keeps the row results.csv had for it: rows are never dropped."""
    path = sweep.out_dir / "results.csv"
    kept = {}
    if path.is_file():
        with path.open(newline="") as f:
            kept = {row["run"]: row for row in csv.DictReader(f) if row.get("run")}
    rows = []
    for run in sweep.runs:
        out = sweep.out_dir / run.name
        if finished(out) and (row := result_row(sweep, run)) is not None:
            rows.append(row)
        elif run.name in kept:
            rows.append(kept[run.name])
    axes = list(sweep.runs[0].axes)
    evals = sorted({k for row in rows for k in row if k.startswith("eval/")})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", *axes, *RESULT_FIELDS[1:], *evals], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def run_sweep(sweep: Sweep, log=print) -> Path:
    """Train every unfinished run in order; returns the results table. Raises Preempted, after recording
    the finished runs, when a run is preempted."""
    from k2jax.train.loop import Preempted, TrainingDiverged, train

    for i, run in enumerate(sweep.runs, 1):
        out = sweep.out_dir / run.name
        if finished(out):
            log(f"[{i}/{len(sweep.runs)}] {run.name}: finished, skipped")
            continue
        resume = bool(finished_steps(out / "checkpoints"))
        log(f"[{i}/{len(sweep.runs)}] {run.name}: {'resuming' if resume else 'training'}")
        try:
            summary = train(sweep.config(run), resume=resume)
        except TrainingDiverged as e:  # a result of the grid (e.g. a learning rate too high), not a failure
            summary = {"diverged_at": e.step, "steps": e.step, "final_eval_loss": None}
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        write_results(sweep)
        if "preempted_at" in summary:
            raise Preempted(f"sweep {sweep.name}: run {run.name} was preempted at step {summary['preempted_at']} "
                            f"(checkpoint saved); run the sweep again to resume it")
        outcome = (f"diverged at step {summary['diverged_at']}, recorded" if "diverged_at" in summary else
                   f"eval loss {summary.get('final_eval_loss', float('nan')):.4f}")
        log(f"[{i}/{len(sweep.runs)}] {run.name}: {outcome}")
    return write_results(sweep)
