"""Two real processes joined by jax.distributed on localhost train, evaluate and checkpoint together.

Each process has 2 fake CPU devices (4 global devices, mesh data=4), reads its own half of the
documents and feeds its rows into global batches. The independent check: the checkpoint they wrote,
restored in this single process onto a 1-device mesh, reproduces the held-out loss they logged.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from k2jax.config import load_config
from k2jax.data import corpus as corpus_lib
from k2jax.data import tokenizer as tokenizer_lib
from k2jax.train.checkpoint import Checkpointer, CheckpointError
from k2jax.train.loop import evaluate, train
from k2jax.train.step import abstract_state, init_train_state, make_eval_step
from batches import eval_batches

ROOT = Path(__file__).parents[1]
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp") / "run"
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "k2jax.cli", "train", str(ROOT / "experiments" / "tiny.yaml"),
           "--set", f"train.out_dir={out}", "--set", f"train.steps={STEPS}", "--set", "train.eval_every=3",
           "--set", "train.log_every=1", "--set", "train.progress=false", "--set", "checkpoint.every=3",
           "--coordinator", f"localhost:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return out, logs


def test_two_processes_train_and_checkpoint(two_process_run):
    out, logs = two_process_run
    assert all(f"done: {STEPS} steps" in log for log in logs)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # written once, by process 0
    assert records[-1]["loss"] < records[0]["loss"]
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [3, 6]
    data = json.loads((out / "checkpoints" / str(STEPS) / "data" / "metadata").read_text())
    assert len(data["processes"]) == 2  # one data-iterator state per process


def test_checkpoint_restores_on_one_device_and_reproduces_eval_loss(two_process_run):
    out, _ = two_process_run
    cfg = load_config(out / "config.yaml", ["mesh.data=1"])
    setup, state = init_train_state(cfg)
    state, _, saved_cfg = Checkpointer(out / "checkpoints").restore(abstract_state(setup, state))
    assert int(state["step"]) == STEPS and saved_cfg["train"]["steps"] == STEPS
    tok = tokenizer_lib.load(out / "tokenizer")
    _, heldout = corpus_lib.load_corpus(cfg.data)
    batches = eval_batches(cfg.data, tok, heldout, cfg.train.batch_size, cfg.train.eval_batches)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]["eval_loss"]
    assert evaluate(make_eval_step(setup), state, batches) == pytest.approx(logged, abs=1e-4)


def test_resume_with_another_process_count_is_refused(two_process_run, tmp_path):
    out, _ = two_process_run
    cfg = load_config(out / "config.yaml", [f"train.steps={STEPS + 2}", "train.progress=false"])
    with pytest.raises(CheckpointError, match="2 processes"):
        train(cfg, resume=True)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [3, 6]


def test_tensor_axis_must_stay_within_a_process():
    """Two hosts with 2 devices each: tensor=2 keeps row-sharing devices on one host, tensor=4 does not."""
    from types import SimpleNamespace

    import numpy as np

    from k2jax.config import ConfigError
    from k2jax.parallel.distributed import check_tensor_axis_within_processes

    devices = np.array([SimpleNamespace(id=i, process_index=i // 2) for i in range(4)])
    check_tensor_axis_within_processes(devices.reshape(2, 1, 1, 2))  # (data, fsdp, expert, tensor)
    with pytest.raises(ConfigError, match=r"mesh.tensor=4 spans processes \[0, 1\]"):
        check_tensor_axis_within_processes(devices.reshape(1, 1, 1, 4))
