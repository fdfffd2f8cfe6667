"""What kills, full disks and user mistakes leave behind, and what a person reads then.

Each failure is reproduced cheaply (a leftover tmp checkpoint made by hand, a step with an item
deleted, a truncated file, a read-only or tiny tmpfs directory); each test checks the message,
the exit code and that nothing was lost or left behind.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from k2jax.config import ConfigError, load_config
from k2jax.train.checkpoint import Checkpointer, CheckpointError, finished_steps
from k2jax.train.loop import train

ROOT = Path(__file__).parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"


def _state(seed):
    return {"w": jnp.full((64, 32), float(seed)), "step": jnp.asarray(seed, jnp.int32)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _saved(directory, steps, keep=3):
    ckpt = Checkpointer(directory, keep=keep, async_save=False)
    for step in steps:
        ckpt.save(step, _state(step), {"i": step}, {"step": step})
    ckpt.close()


def _truncate_largest(step_dir: Path) -> None:
    victim = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])


def _tree(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _cfg(out_dir, *extra):
    return load_config(TINY, [f"train.out_dir={out_dir}", "train.progress=false", "train.steps=4",
                              "train.eval_every=2", "train.log_every=1", "checkpoint.every=2",
                              "checkpoint.async_save=false", *extra])


# --- checkpoints ------------------------------------------------------------------------------------------


def test_unfinished_save_is_no_checkpoint_and_clean_removes_it(tmp_path, capfd):
    _saved(tmp_path, [1])
    (tmp_path / "2.orbax-checkpoint-tmp" / "state").mkdir(parents=True)  # a kill during the save of step 2
    assert finished_steps(tmp_path) == [1]
    assert Checkpointer(tmp_path).all_steps() == [1]
    assert (tmp_path / "2.orbax-checkpoint-tmp").exists()  # opened to read: nothing removed
    Checkpointer(tmp_path, clean=True).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2.orbax-checkpoint-tmp" in err[0] and "did not finish" in err[0]


def test_half_deleted_step_is_skipped_removed_and_retention_holds(tmp_path, capfd):
    _saved(tmp_path, [1, 2, 3], keep=2)
    shutil.rmtree(tmp_path / "3" / "config")  # a kill while orbax deleted step 3
    (tmp_path / "3" / "_CHECKPOINT_METADATA").unlink()
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    assert ckpt.all_steps() == [2]  # step 1 went to retention; 3 is not restorable
    state, data, _ = ckpt.restore(_abstract(_state(0)))
    assert int(state["step"]) == 2 and data == {"i": 2}
    ckpt.close()
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False, clean=True)
    assert "removed" in capfd.readouterr().err and not (tmp_path / "3").exists()
    for step in (3, 4, 5):
        ckpt.save(step, _state(step), {}, {})
    ckpt.close()
    assert finished_steps(tmp_path) == [4, 5]


def test_corrupt_latest_falls_back_to_the_older_good_one(tmp_path, capfd):
    _saved(tmp_path, [1, 2])
    _truncate_largest(tmp_path / "2")
    before = _tree(tmp_path)
    state, data, _ = Checkpointer(tmp_path).restore(_abstract(_state(0)))
    assert int(state["step"]) == 1 and data == {"i": 1}
    np.testing.assert_array_equal(state["w"], _state(1)["w"])
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0] and "trying step 1" in err[0], err
    assert _tree(tmp_path) == before  # restore writes nothing
    _truncate_largest(tmp_path / "1")
    with pytest.raises(CheckpointError, match="corrupt"):
        Checkpointer(tmp_path).restore(_abstract(_state(0)))


# --- training: leftovers, resume checks ------------------------------------------------------------------


def test_tmp_leftover_fresh_start_resume_checks_and_corrupt_latest(tmp_path, capfd):
    out = tmp_path / "run"
    (out / "checkpoints" / "2.orbax-checkpoint-tmp" / "state").mkdir(parents=True)  # killed in its first save
    with pytest.raises(CheckpointError, match="no checkpoint that finished saving"):
        train(_cfg(out), resume=True)
    assert (out / "checkpoints" / "2.orbax-checkpoint-tmp").exists()  # refused: nothing touched
    train(_cfg(out))  # a fresh start is not blocked by it, and removes it
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]

    config_before, ckpts_before = (out / "config.yaml").read_text(), _tree(out / "checkpoints")
    with pytest.raises(ConfigError) as e:  # the model's shape: refused before restoring anything
        train(_cfg(out, "model.d_model=96", "data.seq_len=32", "train.steps=6"), resume=True)
    message = str(e.value)
    assert "model.d_model 64 -> 96" in message and "data.seq_len 64 -> 32" in message
    assert "train.steps" not in message and "\n" not in message
    assert (out / "config.yaml").read_text() == config_before and _tree(out / "checkpoints") == ckpts_before
    with pytest.raises(ConfigError, match="optim.name 'muonclip' -> 'adamw'"):
        train(_cfg(out, "optim.name=adamw", "train.steps=6"), resume=True)

    _truncate_largest(out / "checkpoints" / "4")  # the newest checkpoint is unreadable
    (out / "checkpoints" / "6" / "state").mkdir(parents=True)  # and a step with only part of its items
    capfd.readouterr()
    summary = train(_cfg(out, "train.steps=6", "model.remat=full", "optim.learning_rate=0.005",
                         "checkpoint.keep=1", "mesh.data=1"), resume=True)  # execution and length may change
    assert summary["start_step"] == 2 and summary["steps"] == 6
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(err) == 3, err  # the removed partial step, the unreadable one, where it went
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["remat"] == "full" and saved["train"]["steps"] == 6
    assert (out / "checkpoints" / "4.unreadable").is_dir()
    assert finished_steps(out / "checkpoints") == [6]  # keep=1, and step 6 has the best eval loss
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


# --- sweeps ----------------------------------------------------------------------------------------------


def _sweep_file(tmp_path, grid) -> Path:
    spec = {"name": "t", "base": str(TINY), "out_dir": str(tmp_path / "sweep"),
            "set": {"train.steps": 4, "train.eval_every": 2, "train.log_every": 1, "checkpoint.every": 2,
                    "checkpoint.async_save": False}, "grid": grid}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_preempted_run_stops_the_sweep_is_not_a_result_and_is_resumed(tmp_path, monkeypatch):
    from k2jax.sweep.grid import load_sweep, run_sweep
    from k2jax.train.checkpoint import PreemptionFlag
    from k2jax.train.loop import Preempted

    sweep = load_sweep(_sweep_file(tmp_path, {"optim.name": ["muonclip", "adamw"]}))
    first, second = (sweep.out_dir / run.name for run in sweep.runs)
    monkeypatch.setattr(PreemptionFlag, "reached", lambda self, step: step >= 3)  # SIGTERM during step 3
    with pytest.raises(Preempted, match="name=muonclip was preempted at step 3.*run the sweep again"):
        run_sweep(sweep, log=lambda _: None)
    assert json.loads((first / "summary.json").read_text())["preempted_at"] == 3
    assert not second.exists()  # the sweep stopped
    assert (sweep.out_dir / "results.csv").read_text().strip().count("\n") == 0  # header only
    monkeypatch.undo()
    log = []
    results = run_sweep(sweep, log=log.append)
    assert "name=muonclip: resuming" in log[0]
    rows = results.read_text().strip().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["name=muonclip", "name=adamw"]
    assert all(r.split(",")[-1] == "4" for r in rows)  # steps: both ran to the end
    assert "preempted_at" not in json.loads((first / "summary.json").read_text())


def test_analyze_a_kept_results_csv_without_rewriting_it_and_name_degenerate_fits(tmp_path, capsys):
    from k2jax.cli import main
    from k2jax.sweep.analysis import AnalysisError, analyze

    path = _sweep_file(tmp_path, {"model.num_heads": [2, 4, 8]})  # the committed heads ablation's run names
    out = tmp_path / "sweep"
    out.mkdir()
    shutil.copy(ROOT / "experiments" / "results" / "heads_cpu" / "results.csv", out / "results.csv")
    before = (out / "results.csv").read_bytes()
    assert main(["analyze", str(path)]) == 0  # no run directories: the table is analysed as it is
    printed = capsys.readouterr().out
    assert "analysing its results.csv as it is" in printed
    assert "degenerate fit (three points for three parameters" in printed
    assert (out / "results.csv").read_bytes() == before
    report = (out / "report" / "report.md").read_text()
    assert "three points for three parameters" in report and "metrics.jsonl) are not here" in report
    assert main(["analyze", str(out)]) == 0 and (out / "results.csv").read_bytes() == before  # a directory
    with pytest.raises(AnalysisError, match="--curves reads each run's metrics.jsonl"):
        analyze(out, curves=True)

    (out / "num_heads=2").mkdir()  # a run started again here and not finished: its kept row stays
    assert main(["analyze", str(path)]) == 0
    assert (out / "results.csv").read_text().count("\n") == before.decode().count("\n")
