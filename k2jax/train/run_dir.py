"""A training run's directory, and what a resume may change.

A run directory holds config.yaml, the tokenizer, metrics.jsonl, tb/, checkpoints/ and, at the end,
curves.png and summary.json; process 0 writes all but the checkpoints, which every process writes together.
`prepare_run_dir` and `check_resumed_config` accept or refuse a run before anything is written; a resumed
run may change the settings `k2jax.config.may_change_on_resume` allows (an imported checkpoint: all but
`model.*`).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import yaml

from k2jax.config import Config, ConfigError, from_dict, may_change_on_resume, to_dict, with_legacy_values
from k2jax.parallel import distributed
from k2jax.train.checkpoint import CheckpointError, finished_steps, imported_from, saved_config
from k2jax.train.metrics import plot_run


def prepare_run_dir(cfg: Config, resume: bool) -> tuple[Path, Path]:
    """Check train.out_dir before anything is written: a directory or nothing, writable, holding a finished
    checkpoint exactly when resuming. (run directory, its checkpoints/)."""
    out = Path(cfg.train.out_dir)
    ckpt_dir = out / "checkpoints"
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "train.out_dir is a file, not a directory; choose another "
                                 "train.out_dir", str(out))
    steps = finished_steps(ckpt_dir)
    if resume and not steps:
        raise CheckpointError(f"--resume: {ckpt_dir} holds no checkpoint that finished saving; start the run "
                              f"without --resume")
    if not resume and steps:
        raise ConfigError(f"train.out_dir: {out} already holds checkpoints (steps {steps}); pass --resume to "
                          f"continue it, or set train.out_dir to a new directory (nothing was changed)")
    if distributed.is_primary():
        _check_writable(next(p for p in (out, *out.parents) if p.exists()))
    return out, ckpt_dir


def _check_writable(directory: Path) -> None:
    probe = directory / f".k2jax-write-check-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"cannot write in train.out_dir ({e.strerror})", str(directory)) from e


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumed_config(ckpt_dir: Path, cfg: Config) -> None:
    """Refuse a resume whose config changes a key `may_change_on_resume` does not allow, before anything is
    restored."""
    step, saved = saved_config(ckpt_dir)
    try:
        # keys added since the run started: the value it trained with where known, else today's default
        old = _flat(to_dict(from_dict(Config, with_legacy_values(saved))))
    except ConfigError as e:
        raise CheckpointError(f"--resume: the config saved with step {step} does not load in this version of "
                              f"k2jax ({e})") from e
    new = _flat(to_dict(cfg))
    imported = imported_from(ckpt_dir, step)  # an imported checkpoint fixes only the model
    diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and not (may_change_on_resume(k) or (imported and not k.startswith("model.")))]
    if diff:
        raise ConfigError(f"--resume: these settings differ from the run's (checkpoint step {step}): "
                          f"{'; '.join(diff)}. A resumed run keeps its model, data and optimizer kind (execution, "
                          f"optimizer, length, logging, evaluation, checkpoint and mesh settings may change); use a "
                          f"new train.out_dir for a new run. Nothing was changed")


def write_run_files(cfg: Config, out: Path, tok, resume: bool) -> None:
    """Process 0's first writes: the run directory, its tokenizer (kept when resuming) and config.yaml."""
    out.mkdir(parents=True, exist_ok=True)
    if not (resume and (out / "tokenizer").exists()):
        tok.save(out / "tokenizer")
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def write_results(cfg: Config, out: Path, summary: dict) -> None:
    """Process 0's last writes: curves.png and summary.json."""
    plot_run(out / "metrics.jsonl", out / "curves.png",
             tau=cfg.optim.qk_clip_tau if cfg.optim.name == "muonclip" else None)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
