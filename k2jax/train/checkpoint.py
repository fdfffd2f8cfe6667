"""Checkpoints with one orbax CheckpointManager: train state, data-iterator state, config.

Retention keeps the latest `keep` checkpoints plus the one with the best eval
loss (orbax preservation policies LatestN | BestN). Saves are asynchronous;
orbax writes into a temporary directory and renames it on completion, so an
interrupted save is never listed as a step. Restore either returns everything
or raises CheckpointError; it never writes or deletes.
"""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable."""


def _eval_loss(metrics) -> float:
    value = (metrics or {}).get("eval_loss", math.inf)
    return value if math.isfinite(value) else math.inf


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=_eval_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, data_state: dict, config: dict, metrics: dict | None = None) -> None:
        """Start saving (async); `wait()` blocks until it is on disk."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave(config))
        self._manager.save(step, args=args, metrics={k: float(v) for k, v in (metrics or {}).items()}, force=True)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, abstract_state, step: int | None = None):
        """(state, data_state, config) of `step` (default: latest) into the abstract state's structure."""
        self._manager.reload()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                                  config=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # orbax raises many kinds (FileNotFoundError, ValueError, tensorstore errors)
            raise CheckpointError(f"checkpoint {self.directory / str(step)} is incomplete or corrupt: "
                                  f"{type(e).__name__}: {e}") from e
        if restored.data is None or restored.config is None:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} lacks its data or config item")
        return restored.state, restored.data, restored.config

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


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
