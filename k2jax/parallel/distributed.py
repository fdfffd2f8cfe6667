"""Multi-process runs: jax.distributed start-up and host <-> global array assembly.

Every process runs the same `k2jax train` command. On TPU VMs, SLURM and Open
MPI `--distributed auto` lets JAX find its peers; anywhere else (GPU boxes,
localhost tests) pass the coordinator address, the process count and this
process's id. Each process reads its own share of the data; the batches are
assembled into global arrays without ever gathering them on one host.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from k2jax.config import ConfigError


def initialize(*, auto: bool = False, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the process group (a no-op for a single process); errors name the bad flag."""
    if auto:
        if coordinator or num_processes or process_id is not None:
            raise ConfigError("--distributed auto detects the cluster itself; drop --coordinator, "
                              "--num-processes and --process-id")
        jax.distributed.initialize()
        return
    if coordinator is None and num_processes is None and process_id is None:
        return
    if not coordinator or ":" not in coordinator:
        raise ConfigError(f"--coordinator must be host:port (the address of process 0), got {coordinator!r}")
    if num_processes is None or num_processes < 1:
        raise ConfigError(f"--num-processes must be a positive integer, got {num_processes!r}")
    if process_id is None or not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id must be in [0, {num_processes}), got {process_id!r}")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def is_primary() -> bool:
    """Process 0 writes the run directory's logs, plots and tokenizer; all processes checkpoint."""
    return jax.process_index() == 0


def local_batch_size(global_batch: int) -> int:
    """Rows this process loads per step."""
    n = jax.process_count()
    if global_batch % n:
        raise ConfigError(f"train.batch_size={global_batch} does not split over {n} processes")
    return global_batch // n


def check_tensor_axis_within_processes(device_grid) -> None:
    """Each process loads whole rows, so devices that share rows (one `tensor` group: the
    last mesh axis) must all belong to one process; otherwise rows would silently mismatch."""
    grid = np.asarray(device_grid)
    for group in grid.reshape(-1, grid.shape[-1]):
        processes = sorted({d.process_index for d in group})
        if len(processes) > 1:
            raise ConfigError(f"mesh.tensor={grid.shape[-1]} spans processes {processes}: the tensor axis must "
                              f"stay within one host (at most its {len(group) // len(processes)} local devices)")


def wait_for_all(name: str, timeout_s: int = 1800) -> None:
    """Block until every process reaches the barrier `name`, through the coordination service rather
    than a device collective: processes may arrive minutes apart (one compiled slower), where the
    first CPU (Gloo) collective gives up after 30 s. A name may be waited on again once passed."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the client jax.distributed.initialize started

    jax_distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def from_process_local(batch: dict, sharding: NamedSharding) -> dict:
    """Global arrays from each process's own rows (B / processes, ...) -> (B, ...)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def from_replicated_host(batch: dict, sharding: NamedSharding) -> dict:
    """Global arrays from a batch every process holds whole (e.g. the held-out set)."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]), batch)


def allgather_json(value) -> list:
    """Every process's JSON-serialisable `value`, in process order (a one-element list when alone)."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    longest = int(np.max(multihost_utils.process_allgather(np.asarray([data.size]))))
    padded = np.zeros(longest, np.uint8)
    padded[:data.size] = data
    rows = multihost_utils.process_allgather(padded)  # (processes, longest)
    return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in np.asarray(rows)]
