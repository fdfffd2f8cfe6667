"""What kills, full disks and user mistakes leave behind, and what a person reads then.

Each failure is reproduced cheaply (a leftover tmp checkpoint made by hand, a step with an item
deleted, a truncated file, a read-only or tiny tmpfs directory); each test checks the message,
the exit code and that nothing was lost or left behind.
"""

import csv
import errno
import json
import os
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
    summary = train(_cfg(out, "train.steps=6", "execution.remat=full", "optim.learning_rate=0.005",
                         "checkpoint.keep=1", "mesh.data=1"), resume=True)  # execution and length may change
    assert summary["start_step"] == 2 and summary["steps"] == 6
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(err) == 3, err  # the removed partial step, the unreadable one, where it went
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["execution"]["remat"] == "full" and saved["train"]["steps"] == 6
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


def test_preempted_run_stops_the_sweep_is_not_a_result_and_is_resumed(tmp_path, monkeypatch, capsys):
    from k2jax.cli import main
    from k2jax.sweep.grid import load_sweep, run_sweep
    from k2jax.train.checkpoint import PreemptionFlag
    from k2jax.train.loop import Preempted

    path = _sweep_file(tmp_path, {"optim.name": ["muonclip", "adamw"]})
    sweep = load_sweep(path)
    first, second = (sweep.out_dir / run.name for run in sweep.runs)
    monkeypatch.setattr(PreemptionFlag, "reached", lambda self, step: step >= 3)  # SIGTERM in a launch's 3rd step
    with pytest.raises(Preempted, match="name=muonclip was preempted at step 3.*run the sweep again"):
        run_sweep(sweep, log=lambda _: None)
    assert json.loads((first / "summary.json").read_text())["preempted_at"] == 3
    assert not second.exists()  # the sweep stopped
    assert (sweep.out_dir / "results.csv").read_text().strip().count("\n") == 0  # header only

    capsys.readouterr()  # the same from the command line: the first run is resumed and finishes (step 4),
    assert main(["sweep", str(path)]) == 143  # the second is preempted in its step 3
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "name=adamw was preempted at step 3" in err[0], err
    assert "name=muonclip: resuming" in captured.out
    assert [r.split(",")[0] for r in (sweep.out_dir / "results.csv").read_text().strip().splitlines()[1:]] == [
        "name=muonclip"]

    monkeypatch.undo()
    log = []
    results = run_sweep(sweep, log=log.append)
    assert "name=muonclip: finished, skipped" in log[0] and "name=adamw: resuming" in log[1]
    rows = results.read_text().strip().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["name=muonclip", "name=adamw"]
    assert [row["steps"] for row in csv.DictReader(results.open())] == ["4", "4"]  # both ran to the end
    assert not any("preempted_at" in json.loads((d / "summary.json").read_text()) for d in (first, second))


def test_analyze_a_kept_results_csv_without_rewriting_it_and_name_degenerate_fits(tmp_path, capsys):
    from k2jax.cli import main
    from k2jax.sweep.analysis import AnalysisError, analyze

    path = _sweep_file(tmp_path, {"model.attention.num_heads": [2, 4, 8]})  # the committed heads ablation's run names
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


# --- the command line: one or two lines, a documented exit status, nothing left behind ------------------


def _cli(capsys, *args) -> tuple[int, list[str]]:
    from k2jax.cli import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def test_user_errors_are_one_line_with_their_exit_status(tmp_path, capsys):
    from k2jax.cli import EXIT_STATUS, build_parser

    assert EXIT_STATUS in build_parser().format_help()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: tiny\n train: [\n")
    code, err = _cli(capsys, "train", str(bad))
    assert code == 2 and len(err) == 1 and "bad.yaml: not valid YAML" in err[0] and "line 3" in err[0], err
    code, err = _cli(capsys, "train", str(bad), "--debug")
    assert code == 2 and "Traceback" in err[0] and "not valid YAML" in err[-1]
    code, err = _cli(capsys, "train", str(TINY), "--set", "train.steps=[1,")
    assert code == 2 and len(err) == 1 and "--set train.steps=[1,: the value is not valid YAML" in err[0], err

    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    code, err = _cli(capsys, "train", str(TINY), "--set", f"train.out_dir={a_file}")
    assert code == 5 and len(err) == 1 and "is a file" in err[0] and a_file.read_text() == "mine", err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _cli(capsys, "train", str(TINY), "--set", f"train.out_dir={empty}", "--resume")
    assert code == 3 and len(err) == 1 and "no checkpoint that finished saving" in err[0], err
    assert not any(empty.iterdir())

    no_text = tmp_path / "no_text"
    no_text.mkdir()
    for extra, words in ((["model.vocab_size=100"], "model.vocab_size"), ([f"data.corpus={no_text}"], "empty")):
        out = tmp_path / "never"
        code, err = _cli(capsys, "train", str(TINY), "--set", f"train.out_dir={out}",
                         *[a for e in extra for a in ("--set", e)])
        assert code == 2 and len(err) == 1 and words in err[0], err
        assert not out.exists()  # a failed validation leaves no run directory behind


def test_divergence_names_the_checkpoint_an_async_save_kept(tmp_path, capsys):
    out = tmp_path / "nan"
    code, err = _cli(capsys, "train", str(TINY), "--set", f"train.out_dir={out}", "--set", "train.progress=false",
                     "--set", "optim.name=adamw", "--set", "optim.learning_rate=1e30", "--set", "optim.grad_clip_norm=0",
                     "--set", "optim.warmup_steps=0", "--set", "checkpoint.every=1", "--set", "train.log_every=1")
    assert code == 4 and len(err) == 1 and "diverged at step" in err[0], err
    kept = finished_steps(out / "checkpoints")
    assert kept and f"the last good checkpoint, step {kept[-1]}," in err[0], (err, kept)


def _mount_tmpfs(path: Path, options: str) -> None:
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")


def _umount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", "--lazy", str(path)], capture_output=True)  # detached even while a file is open


def test_read_only_out_dir_is_refused_before_anything_runs(tmp_path, capsys):
    import os

    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        (parent / "probe").write_text("")  # root ignores the mode bits: a read-only mount then
        (parent / "probe").unlink()
        parent.chmod(0o755)
        _mount_tmpfs(parent, "ro,size=64k")
        mounted = True
    except PermissionError:
        mounted = False
    try:
        code, err = _cli(capsys, "train", str(TINY), "--set", f"train.out_dir={parent / 'run'}")
        assert code == 5 and len(err) == 1 and "cannot write in train.out_dir" in err[0], err
        assert ("Read-only" in err[0]) if mounted else ("Permission denied" in err[0])
        assert not os.path.exists(parent / "run")
    finally:
        if mounted:
            _umount(parent)
        parent.chmod(0o755)


def test_full_disk_ends_the_run_promptly_in_one_line(tmp_path):
    import subprocess
    import sys

    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=1m")  # room for the run directory, not for a checkpoint
    try:
        proc = subprocess.run([sys.executable, "-m", "k2jax.cli", "train", str(TINY), "--set",
                               f"train.out_dir={disk / 'run'}", "--set", "train.progress=false", "--set",
                               "checkpoint.every=5", "--set", "train.log_every=1"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)  # never a hang
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 5 and len(err) <= 2, proc.stderr[-3000:]
        assert "No space left on device" in err[-1] and "--resume" in err[-1], err
        assert "removed its partial directory" in err[-1] and "no checkpoint has finished saving" in err[-1], err
        assert not list((disk / "run" / "checkpoints").iterdir())  # the failed save holds no space
        steps = [json.loads(line)["step"] for line in (disk / "run" / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) <= 10  # stopped at the failed save or the next one, not at the end (20)
    finally:
        _umount(disk)


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _train_args(out, *extra) -> list[str]:
    return ["train", str(TINY), "--set", f"train.out_dir={out}", "--set", "train.progress=false", "--set",
            "train.log_every=1", "--set", "train.eval_every=2", "--set", "checkpoint.every=2",
            *[a for e in extra for a in ("--set", e)]]


def test_a_failed_save_removes_its_partial_directory_and_resume_works_once_space_is_back(tmp_path, capsys,
                                                                                        monkeypatch):
    """The disk fills during step 4's (background) save: orbax has written part of it into
    4.orbax-checkpoint-tmp when a write is refused. The run ends in one line naming the step, what was
    removed and what is left; nothing partial stays on the full disk; with space back, --resume goes on."""
    from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler

    write_json = JsonCheckpointHandler._save_fn

    async def disk_full_in_step_4(self, item, directory):
        if "4.orbax-checkpoint-tmp" in str(directory):
            raise _no_space()
        return await write_json(self, item, directory)

    monkeypatch.setattr(JsonCheckpointHandler, "_save_fn", disk_full_in_step_4)
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    code, err = _cli(capsys, *_train_args(out, "train.steps=6"))
    assert code == 5 and len(err) == 1, err
    assert err[0].startswith("k2jax train: I/O error: saving checkpoint step 4 failed: ENOSPC (No space left on "
                             "device); removed its partial directory ") and "4.orbax-checkpoint-tmp" in err[0], err
    assert f"the last finished checkpoint is step 2 ({ckpts / '2'})" in err[0], err
    assert sorted(p.name for p in ckpts.iterdir()) == ["2"] and finished_steps(ckpts) == [2]
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) >= 4, logged  # found after step 5 or 6

    monkeypatch.undo()  # space is back
    capsys.readouterr()
    code, err = _cli(capsys, *_train_args(out, "train.steps=6"), "--resume")
    assert code == 0, err
    assert finished_steps(ckpts) == [4, 6] and not list(ckpts.glob("*orbax-checkpoint-tmp*"))
    assert json.loads((out / "summary.json").read_text())["start_step"] == 2


class _DiskFullAtStep:
    """os, as k2jax.train.metrics sees it, on a disk that fills while metrics.jsonl's record of `step` is written:
    half the line reaches the file, then every write there is refused (ENOSPC)."""

    def __init__(self, step: int):
        self._record = f'{{"step": {step},'.encode()
        self._full: int | None = None  # the refused file descriptor

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd: int, data) -> int:
        if fd == self._full:
            raise _no_space()
        if bytes(data[:len(self._record)]) == self._record:
            self._full = fd
            return os.write(fd, data[: len(data) // 2])
        return os.write(fd, data)


def test_a_failed_metrics_write_ends_the_run_at_that_step_in_one_line(tmp_path, capsys, monkeypatch):
    """metrics.jsonl's write of step 5 fails part-way (a disk filled between saves): the run stops at step 5,
    before any further save, in one line naming the step, the file and the checkpoint left (step 4); the half
    line is cut off, so the file reads and a resumed run appends whole lines."""
    from k2jax.train import metrics

    monkeypatch.setattr(metrics, "os", _DiskFullAtStep(5))
    out = tmp_path / "run"
    code, err = _cli(capsys, *_train_args(out, "train.steps=6"))
    assert code == 5 and len(err) == 1, err
    assert err[0].startswith(f"k2jax train: I/O error: writing the metrics of step 5 to {out / 'metrics.jsonl'} "
                             f"failed: No space left on device; the run stopped at step 5 and saved nothing more; "
                             f"the last finished checkpoint is step 4 ({out / 'checkpoints' / '4'})"), err
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert finished_steps(out / "checkpoints") == [2, 4] and not list((out / "checkpoints").glob("*tmp*"))

    monkeypatch.undo()
    code, err = _cli(capsys, *_train_args(out, "train.steps=6"), "--resume")
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6] and (out / "curves.png").exists()


def test_metrics_writer_on_a_full_disk_raises_instead_of_hanging(tmp_path):
    import threading

    from k2jax.train.metrics import MetricsWriter

    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=64k")
    outcome = []

    def fill():
        writer = MetricsWriter(disk)
        try:
            for step in range(1, 100_000):
                writer.write(step, {"loss": 1.0, "per_head": [[float(h) for h in range(16)]] * 8})
        except OSError as e:
            outcome.append(e)
        finally:
            try:
                writer.close()
            except OSError:
                pass

    try:
        thread = threading.Thread(target=fill, daemon=True)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), "writing metrics to a full disk hung"
        assert outcome and "No space left" in str(outcome[0])
    finally:
        _umount(disk)


def test_ctrl_c_waits_for_the_save_in_flight_and_exits_130(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cli = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "  # a shell may ignore it
           "from k2jax.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", cli, "train", str(TINY), "--set", f"train.out_dir={out}",
                             "--set", "train.progress=false", "--set", "train.log_every=1", "--set",
                             "checkpoint.every=5", "--set", "train.steps=200"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=240)
    err = stderr.strip().splitlines()
    assert proc.returncode == 130 and len(err) == 1 and "--resume" in err[0], stderr[-3000:]
    assert finished_steps(out / "checkpoints")  # step 5's save, in flight or done, was completed


def test_resume_compares_a_setting_the_run_predates_with_the_value_it_trained_with(tmp_path, monkeypatch):
    """A checkpoint saved before the model config was split (flat keys) and before
    model.moe.router_balance existed trained with the sign rule: resuming it under today's default
    (quantile) is a change of the model's routing, refused by name; with the rule it trained with it
    resumes, and its execution settings may change."""
    import yaml

    from k2jax.train import run_dir

    saved = yaml.safe_load((ROOT / "tests" / "data" / "config_before_split.yaml").read_text())
    del saved["model"]["router_balance"]
    monkeypatch.setattr(run_dir, "saved_config", lambda ckpt_dir: (10, saved))
    default = ROOT / "experiments" / "default.yaml"
    byte_level = ["data.tokenizer=byte", "data.bpe_vocab_size=1024"]  # the data it trained on
    with pytest.raises(ConfigError, match=r"differ from the run's \(checkpoint step 10\): "
                                          r"model.moe.router_balance 'sign' -> 'quantile'\. "):
        run_dir.check_resumed_config(tmp_path / "checkpoints", load_config(default, byte_level))
    run_dir.check_resumed_config(tmp_path / "checkpoints", load_config(  # the rule it trained with: accepted
        default, ["model.moe.router_balance=sign", *byte_level, "execution.remat=full",
                  "execution.attention_impl=plain"]))