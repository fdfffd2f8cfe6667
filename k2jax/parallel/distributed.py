"""Multi-process runs: jax.distributed start-up and host <-> global array assembly.

Every process runs the same `k2jax train` command. On TPU VMs, SLURM and Open
MPI `--distributed auto` lets JAX find its peers; anywhere else (GPU boxes,
localhost tests) pass the coordinator address, the process count and this
process's id. Each process reads its own share of the data; the batches are
assembled into global arrays without ever gathering them on one host.

A process that dies ends the others: every process keeps a TCP connection to
process 0 (`_PeerWatch`), whose closing without a goodbye (the process was killed
or crashed) is noticed at once, and whose host going silent is noticed by TCP
keepalive after `--heartbeat-timeout` seconds. The survivors print one line naming
the lost process and exit with `PEER_LOST_EXIT`; `--resume` continues the run.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import selectors
import socket
import sys
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from k2jax.config import ConfigError


PEER_LOST_EXIT = 7  # of the CLI: another process of the run died or its host went silent
DEFAULT_HEARTBEAT_TIMEOUT_S = 30
_WATCH_KEY = "k2jax/peer_watch_port"


def initialize(*, auto: bool = False, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_S) -> None:
    """Join the process group (a no-op for a single process) and watch the other processes (`_PeerWatch`);
    errors name the bad flag. `heartbeat_timeout`: seconds a process whose host stops answering is waited
    for; JAX's own heartbeat, whose expiry aborts the process with JAX's message, is set 3 x longer, as a
    backstop."""
    if isinstance(heartbeat_timeout, bool) or not isinstance(heartbeat_timeout, int) or heartbeat_timeout < 3:
        raise ConfigError(f"--heartbeat-timeout must be a whole number of seconds, at least 3, "
                          f"got {heartbeat_timeout!r}")
    timeouts = {"heartbeat_timeout_seconds": 3 * heartbeat_timeout}
    if auto:
        if coordinator or num_processes or process_id is not None:
            raise ConfigError("--distributed auto detects the cluster itself; drop --coordinator, "
                              "--num-processes and --process-id")
        jax.distributed.initialize(**timeouts)
        _watch_peers(heartbeat_timeout)
        return
    if coordinator is None and num_processes is None and process_id is None:
        return
    if not coordinator or ":" not in coordinator:
        raise ConfigError(f"--coordinator must be host:port (the address of process 0), got {coordinator!r}")
    if num_processes is None or num_processes < 1:
        raise ConfigError(f"--num-processes must be a positive integer, got {num_processes!r}")
    if process_id is None or not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id must be in [0, {num_processes}), got {process_id!r}")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id, **timeouts)
    _watch_peers(heartbeat_timeout)


def wait_for_lost_peer(timeout_s: float = 2.0) -> None:
    """Give the peer watch `timeout_s` to notice a lost process, which ends this one (PEER_LOST_EXIT): called
    before reporting an error that a dead peer may have caused (a failed collective), so that the run ends
    naming the dead process rather than the symptom. Returns at once in a single-process run."""
    if _watch is not None and _watch.lost.wait(timeout_s):
        time.sleep(60)  # the watch is ending this process: report nothing else meanwhile


_watch: _PeerWatch | None = None


def _watch_peers(heartbeat_timeout: int) -> None:
    global _watch
    if jax.process_count() > 1 and _watch is None:
        from jax._src import distributed as jax_distributed  # the client jax.distributed.initialize started

        state = jax_distributed.global_state
        _watch = _PeerWatch(state.client, jax.process_index(), jax.process_count(),
                            state.coordinator_address.rsplit(":", 1)[0].strip("[]"), heartbeat_timeout)


class _PeerWatch:
    """Process 0 listens on a free port (published in the coordination service's key-value store); every other
    process connects to it and says hello. Nothing is sent after that until the end: a process leaving through
    Python (done, an error, SIGTERM, Ctrl-C) says goodbye at exit, so only a connection that closes without one
    (the process was killed or crashed: the kernel closes its sockets) or fails (TCP keepalive: its host stopped
    answering for `timeout_s`) is a lost process. Process 0 passes a loss on to the others and waits (3 s at
    most) for them to end before it ends itself, taking the coordination service with it; a process that loses
    process 0 ends too. Each prints one line on stderr and exits with PEER_LOST_EXIT. The sockets live in the
    kernel, so a busy process (a long compile, the GIL held) never looks dead. Without the connection (a
    firewall between the hosts) a warning says so and JAX's heartbeat (3 x timeout_s) is what ends the run."""

    def __init__(self, client, me: int, count: int, coordinator_host: str, timeout_s: int):
        self.me, self.count, self.timeout_s = me, count, timeout_s
        self.lost = threading.Event()  # set once a loss is being reported; the process then ends
        self.closing = False  # set at a normal exit: connections closing after it are not losses
        self.lock = threading.Lock()
        self.peers: dict[socket.socket, int | None] = {}  # connection -> process id (None until its hello)
        self.server: socket.socket | None = None
        if me == 0:
            family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
            self.server = socket.create_server(("", 0), family=family, dualstack_ipv6=family == socket.AF_INET6)
            client.key_value_set(_WATCH_KEY, str(self.server.getsockname()[1]))
            target, args = self._serve, ()
        else:
            try:
                port = int(client.blocking_key_value_get(_WATCH_KEY, 120_000))
                sock = socket.create_connection((coordinator_host, port), timeout=timeout_s)
                _keepalive(sock, timeout_s)
                sock.sendall(f"hello {me}\n".encode())
            except Exception as e:  # noqa: BLE001 (the run goes on, watched by JAX's heartbeat only)
                print(f"k2jax: warning: process {me} cannot reach process 0's peer watch on {coordinator_host} "
                      f"({e}); a process that dies is noticed only by JAX's heartbeat, after up to "
                      f"{3 * timeout_s} s (--heartbeat-timeout x 3)", file=sys.stderr, flush=True)
                return
            self.peers[sock] = 0
            target, args = self._follow, (sock,)
        threading.Thread(target=target, args=args, name="k2jax-peer-watch", daemon=True).start()
        atexit.register(self.goodbye)
        os.register_at_fork(after_in_child=self._forget)  # a forked child must not keep the connections open

    def goodbye(self) -> None:
        """At a normal exit: tell the others this process is leaving on purpose."""
        with self.lock:
            self.closing = True
            for sock in list(self.peers):
                _send(sock, b"bye\n")
                _close(sock)
            if self.server is not None:
                _close(self.server)

    def _forget(self) -> None:
        for sock in [*self.peers, *([self.server] if self.server else [])]:
            _close(sock)
        self.peers, self.server, self.closing = {}, None, True

    def _serve(self) -> None:
        """Process 0: accept the others' connections and watch them all."""
        selector = selectors.DefaultSelector()
        selector.register(self.server, selectors.EVENT_READ)
        pending: dict[socket.socket, bytes] = {}
        while not self.closing:
            for key, _ in selector.select():
                sock = key.fileobj
                if sock is self.server:
                    try:
                        conn, _ = sock.accept()
                    except OSError:  # closed by goodbye
                        return
                    _keepalive(conn, self.timeout_s)
                    with self.lock:
                        self.peers[conn] = None
                    pending[conn] = b""
                    selector.register(conn, selectors.EVENT_READ)
                    continue
                data, failure = _receive(sock, self.timeout_s)
                *lines, pending[sock] = (pending[sock] + data).split(b"\n")
                left = False
                for line in lines:
                    word, _, rest = line.decode(errors="replace").partition(" ")
                    if word == "hello" and rest.isdigit():
                        with self.lock:
                            self.peers[sock] = int(rest)
                    left |= word == "bye"
                if data and not left:
                    continue
                selector.unregister(sock)
                with self.lock:
                    who = self.peers.pop(sock, None)
                _close(sock)
                if not left and who is not None:
                    self._lost(who, failure)

    def _follow(self, sock: socket.socket) -> None:
        """Every other process: watch the connection to process 0."""
        pending = b""
        while not self.closing:
            data, failure = _receive(sock, self.timeout_s)
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                word, _, rest = line.decode(errors="replace").partition(" ")
                if word == "bye":
                    return
                who, _, why = rest.partition(" ")
                if word == "dead" and who.isdigit():
                    self._lost(int(who), f"{why}; seen by process 0")
            if not data:
                self._lost(0, failure)

    def _lost(self, who: int, why: str) -> None:
        """Report the loss of process `who` and end this process (never returns, unless exiting anyway)."""
        with self.lock:
            if self.closing:
                return
            self.closing = True
            others = [s for s, p in self.peers.items() if p != who]
        self.lost.set()
        os.write(2, (f"k2jax train: process {who} stopped responding ({why}); ending process {self.me} "
                     f"too (exit status {PEER_LOST_EXIT}); continue with --resume in every process\n"
                     ).encode())
        if self.me == 0:  # pass it on; the coordination service ends with this process, so let them go first
            for sock in others:
                _send(sock, f"dead {who} {why}\n".encode())
            deadline = time.monotonic() + 3
            for sock in others:
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    while sock.recv(256):
                        pass
                except OSError:
                    pass
        os._exit(PEER_LOST_EXIT)


def _keepalive(sock: socket.socket, timeout_s: int) -> None:
    """TCP keepalive probes from the kernel: the connection fails about `timeout_s` after the other host
    stops answering, however busy either process is."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux
        idle = max(timeout_s // 3, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max((timeout_s - idle) // 4, 1))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # unacknowledged data (a goodbye to a vanished host) fails too
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_s * 1000)
    sock.settimeout(None)


def _receive(sock: socket.socket, timeout_s: int) -> tuple[bytes, str | None]:
    """(bytes read, or b"" at the end; why the connection ended, where it did)."""
    try:
        data = sock.recv(4096)
    except OSError as e:
        if e.errno == errno.ETIMEDOUT or isinstance(e, TimeoutError):
            return b"", f"its host did not answer for {timeout_s} s"
        return b"", f"its connection failed: {e.strerror or e}"
    return data, None if data else "its connection closed without a goodbye: it was killed or crashed"


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.settimeout(1)
        sock.sendall(data)
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


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
