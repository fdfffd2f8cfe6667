"""Checkpoints with one orbax CheckpointManager: train state, data-iterator state, config.

Retention keeps the latest `keep` checkpoints plus the one with the best eval
loss (orbax preservation policies LatestN | BestN). Saves are asynchronous and
one at a time, so a kill loses the steps since the last save that reached the
disk: at most about 2 x `every` (a save still in flight and the steps after it).

What a kill can leave behind: orbax writes into `N.orbax-checkpoint-tmp*` and
renames it when complete, so an interrupted save never becomes a step; a kill
while an old step is deleted can leave a step directory without all its items.
Neither is listed as a step, and a Checkpointer opened with `clean=True` (the
training loop) removes both. A save that fails (a full disk) removes its own
`N.orbax-checkpoint-tmp*` directory at once, so it holds no space, and its error
names what was removed and the last finished checkpoint. Restore returns everything or raises
CheckpointError and never writes; asked for the latest step, it falls back from
an unreadable checkpoint to the next older one, with a one-line warning.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from k2jax.parallel import distributed

# files every finished step has: one per item, and the step's own metadata
_STEP_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "data/metadata", "config/metadata")
_TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable."""

    exit_code = 3  # of the CLI


def warn(message: str) -> None:
    """One line on stderr, from process 0."""
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _eval_loss(metrics) -> float:
    value = (metrics or {}).get("eval_loss", math.inf)
    return value if math.isfinite(value) else math.inf


def _is_complete(step_dir: Path) -> bool:
    """Whether a step directory holds every item (the state's data files are checked by restoring)."""
    return all((step_dir / name).is_file() for name in _STEP_FILES)


def finished_steps(directory: str | Path) -> list[int]:
    """Steps with a complete checkpoint in `directory`, oldest first; no orbax, nothing written."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and _is_complete(p))


def saved_config(directory: str | Path) -> tuple[int, dict]:
    """(step, config) of the newest finished checkpoint whose config reads; nothing written."""
    for step in reversed(finished_steps(directory)):
        try:
            return step, json.loads((Path(directory) / str(step) / "config" / "metadata").read_text())
        except (OSError, ValueError):
            continue
    raise CheckpointError(f"no finished checkpoint in {directory} has a readable config")


def imported_from(directory: str | Path, step: int) -> str | None:
    """The Hugging Face directory a checkpoint was imported from (`k2jax import`), else None; nothing written."""
    try:
        data = json.loads((Path(directory) / str(step) / "data" / "metadata").read_text())
    except (OSError, ValueError):
        return None
    return data.get("imported_from") if isinstance(data, dict) else None


def _leftovers(directory: Path) -> list[tuple[Path, str]]:
    """(path, why) for what interrupted saves and deletions left in a checkpoint directory."""
    if not directory.is_dir():
        return []
    out = []
    for p in sorted(directory.iterdir()):
        if _TMP_MARK in p.name:
            out.append((p, "a save that did not finish"))
        elif p.name.isdigit() and p.is_dir() and not _is_complete(p):
            missing = [name for name in _STEP_FILES if not (p / name).is_file()]
            out.append((p, f"an incomplete step (no {', '.join(missing)}; a deletion or save was interrupted)"))
    return out


def _save_error(e: Exception, step: int, aftermath: str = "") -> Exception:
    """The error to raise for a failed save: an OSError where the OS refused (disk full, read-only),
    else a CheckpointError. aftermath: what the failure left, appended after "; "."""
    code = e.errno if isinstance(e, OSError) else None
    found = re.search(r"os_error_code='?(\d+)", str(e))
    if code is None and found:
        code = int(found.group(1))
    tail = f"; {aftermath}" if aftermath else ""
    if code is not None:
        return OSError(code, f"saving checkpoint step {step} failed: {errno.errorcode.get(code, code)} "
                             f"({os.strerror(code)}){tail}")
    return CheckpointError(f"saving checkpoint step {step} failed: {type(e).__name__}: {_first_line(e)}{tail}")


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True, clean: bool = False):
        """clean: first remove unfinished saves and incomplete steps (from process 0; only where nothing
        else is saving into `directory`)."""
        self.directory = Path(directory).absolute()
        if clean:
            if jax.process_index() == 0:
                for path, why in _leftovers(self.directory):
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                    warn(f"removed {path}: {why}")
            distributed.wait_for_all("k2jax_checkpoint_clean")
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=_eval_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._saving: int | None = None

    def save(self, step: int, state, data_state: dict, config: dict, metrics: dict | None = None) -> None:
        """Start saving (async); `wait()` blocks until it is on disk. Raises OSError where the OS refuses
        (the previous save's failure too), after removing the failed save's partial directory."""
        self.wait()  # the previous save's failure is that step's
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave(config))
        self._saving = step
        try:
            self._manager.save(step, args=args, metrics={k: float(v) for k, v in (metrics or {}).items()},
                               force=True)
        except Exception as e:
            raise self._failed(e) from e

    def check(self) -> None:
        """Raise now if a background save failed (e.g. a full disk), instead of at the next save."""
        try:
            self._manager.check_for_errors()
        except Exception as e:
            raise self._failed(e) from e

    def _failed(self, e: Exception) -> Exception:
        """The error of the save of step `self._saving`, once its partial directory is removed (so a full disk
        gets that space back; finished checkpoints are never touched)."""
        step = self._saving
        removed, left = self.remove_partial(step)
        what = "".join(f"{words} {', '.join(str(p) for p in paths)}; " for words, paths in (
            ("removed its partial directory", removed), ("could not remove its partial directory", left)) if paths)
        return _save_error(e, step, what + self.remains())

    def remove_partial(self, step: int | None) -> tuple[list[Path], list[Path]]:
        """Remove what an unfinished save of `step` wrote (its `step.orbax-checkpoint-tmp*` directories, nothing
        else); (the paths removed, those that would not go)."""
        if step is None or not self.directory.is_dir():
            return [], []
        _let_writes_end()
        removed, left = [], []
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(f"{step}{_TMP_MARK}"):
                shutil.rmtree(path, ignore_errors=True)  # every process that saw the failure: whoever is first
                (left if path.exists() else removed).append(path)
        return removed, left

    def remains(self) -> str:
        """What a run that stops now keeps, in words: its newest finished checkpoint (read from the disk)."""
        steps = finished_steps(self.directory)
        if not steps:
            return f"no checkpoint has finished saving in {self.directory} (the run starts over, without --resume)"
        return f"the last finished checkpoint is step {steps[-1]} ({self.directory / str(steps[-1])})"

    def latest_step(self) -> int | None:
        """The newest finished step (after `wait()`, every save started is counted)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Finished steps, oldest first."""
        return [s for s in sorted(self._manager.all_steps()) if _is_complete(self.directory / str(s))]

    def restore(self, abstract_state, step: int | None = None):
        """(state, data_state, config) of `step`, or of the newest readable checkpoint, into the abstract
        state's structure."""
        self._manager.reload()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory} finished saving")
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; have {steps}")
        candidates = [step] if step is not None else steps[::-1]
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                                  config=ocp.args.JsonRestore())
        for newer, s in zip(candidates, candidates[1:]):
            try:
                return self._items(self._restore(newer, args))
            except CheckpointError as e:
                warn(f"{e}; trying step {s}")
        return self._items(self._restore(candidates[-1], args))

    @staticmethod
    def _items(restored):
        return restored.state, restored.data, restored.config

    def _restore(self, step: int, args):
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # orbax raises many kinds (FileNotFoundError, ValueError, tensorstore errors)
            raise CheckpointError(f"checkpoint {self.directory / str(step)} is incomplete or corrupt "
                                  f"({type(e).__name__}: {_first_line(e)})") from e
        if any(restored[k] is None for k in args.keys()):
            raise CheckpointError(f"checkpoint {self.directory / str(step)} lacks an item")
        return restored

    def set_aside(self, step: int) -> Path:
        """Rename an unreadable step out of the way (to N.unreadable), so training can save that step again."""
        src = self.directory / str(step)
        dst = src.with_name(f"{step}.unreadable")
        if jax.process_index() == 0:
            shutil.rmtree(dst, ignore_errors=True)
            src.rename(dst)
        distributed.wait_for_all("k2jax_checkpoint_set_aside")
        self._manager.reload()
        return dst

    def wait(self) -> None:
        """Block until the save in flight is on disk; OSError or CheckpointError if it failed (its partial
        directory removed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._failed(e) from e

    def close(self) -> None:
        self._manager.close()


def _let_writes_end(timeout: float = 60.0) -> None:
    """Wait for the writes a failed save may still run. Orbax commits each item in a thread of its own
    (`_SignalingThread`), and one item failing does not stop the others, whose writes (tensorstore creates
    directories as it goes) would bring back a directory removed before they end."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and type(thread).__name__ == "_SignalingThread":
            threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))  # not its join: that re-raises


def _first_line(e: Exception) -> str:
    """The gist of an orbax/tensorstore error: its first sentence, shortened."""
    text = str(e).strip().split("\n")[0].split(". See ")[0]
    return text if len(text) <= 160 else text[:157] + "..."


class PreemptionFlag:
    """SIGTERM (TPU VM preemption) -> the loop saves and exits cleanly.

    Alone, a SIGTERM handler sets a flag. In a multi-process job JAX's preemption
    service catches the signal on any host and picks one step at which every
    process stops together (multihost_utils.reached_preemption_sync_point).
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = None
        self._multi_process = jax.process_count() > 1
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; call it every step, in every process."""
        if self._multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._event.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
