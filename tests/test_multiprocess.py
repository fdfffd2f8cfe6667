"""Two real processes joined by jax.distributed on localhost train, evaluate and checkpoint together.

Each process has 2 fake CPU devices (4 global devices, mesh data=4), reads its own half of the
documents and feeds its rows into global batches. The independent check: the checkpoint they wrote,
restored in this single process onto a 1-device mesh, reproduces the held-out loss they logged.
A process SIGKILLed mid-run ends the other at once, with a line naming it, and `--resume` in both
continues exactly as the uninterrupted run did.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from k2jax.config import load_config
from k2jax.data import corpus as corpus_lib
from k2jax.data import tokenizer as tokenizer_lib
from k2jax.train.checkpoint import Checkpointer, CheckpointError, finished_steps
from k2jax.train.loop import evaluate, train
from k2jax.train.step import abstract_state, init_train_state, make_eval_step
from batches import eval_batches

ROOT = Path(__file__).parents[1]
STEPS = 9  # checkpoints at 3, 6, 9: the kill test stops a run after 3 with steps to spare
SAVED = [STEPS - 3, STEPS]  # checkpoint.keep=2 (the default) of the saves at 3, 6, 9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(out: Path, *extra: str) -> list[subprocess.Popen]:
    """`k2jax train` of the tiny config in 2 processes on localhost; each one's output goes to OUT.pI.log."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "k2jax.cli", "train", str(ROOT / "experiments" / "tiny.yaml"),
           "--set", f"train.out_dir={out}", "--set", f"train.steps={STEPS}", "--set", "train.eval_every=3",
           "--set", "train.log_every=1", "--set", "train.progress=false", "--set", "checkpoint.every=3",
           "--coordinator", f"localhost:{port}", "--num-processes", "2", *extra]
    out.parent.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(2):
        with (out.parent / f"{out.name}.p{i}.log").open("w") as log:
            procs.append(subprocess.Popen(cmd + ["--process-id", str(i)], cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
    return procs


def _finish(out: Path, procs: list[subprocess.Popen]) -> list[str]:
    for p in procs:
        p.wait(timeout=300)
    return [(out.parent / f"{out.name}.p{i}.log").read_text() for i in range(len(procs))]


def _records(out: Path) -> dict[int, dict]:
    """step -> its metrics.jsonl record, the last one of each step (a resumed run logs its steps again)."""
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp") / "run"
    procs = _start(out)
    logs = _finish(out, procs)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return out, logs


def test_two_processes_train_and_checkpoint(two_process_run):
    out, logs = two_process_run
    assert all(f"done: {STEPS} steps" in log for log in logs)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # written once, by process 0
    assert records[-1]["loss"] < records[0]["loss"]
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == SAVED
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
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == SAVED


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


KILL_BOUND_S = 10  # seconds from the SIGKILL to the survivor's exit: measured 0.1 s (README, docs/scale_out.md)


def test_a_killed_process_ends_the_other_and_resume_continues_exactly(two_process_run, tmp_path):
    """SIGKILL process 1 after the first checkpoint: process 0 ends at once (exit 7) naming it, and `--resume`
    in both processes gives every later step's metrics bit for bit as the uninterrupted run logged them."""
    ref_out, _ = two_process_run
    out = tmp_path / "run"
    procs = _start(out)
    deadline = time.time() + 240
    while not finished_steps(out / "checkpoints") and time.time() < deadline and procs[0].poll() is None:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    procs[0].wait(timeout=120)
    took = time.time() - killed
    logs = _finish(out, procs)
    assert procs[0].returncode == 7 and took < KILL_BOUND_S, (procs[0].returncode, took, logs[0][-3000:])
    assert ("k2jax train: process 1 stopped responding (its connection closed without a goodbye: it was killed "
            "or crashed); ending process 0 too (exit status 7); continue with --resume in every process") in logs[0]
    resume_at = finished_steps(out / "checkpoints")[-1]
    assert resume_at < STEPS, "the run finished before process 1 was killed"

    resumed = _start(out, "--resume")
    logs = _finish(out, resumed)
    assert [p.returncode for p in resumed] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert f"resuming at step {resume_at}" in logs[0]
    assert all(f"done: {STEPS} steps ({STEPS - resume_at} in this launch)" in log for log in logs)
    ref, got = _records(ref_out), _records(out)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    timing = {"tokens_per_s", "step_time", "mfu"}
    for step in range(resume_at + 1, STEPS + 1):
        assert {k: v for k, v in got[step].items() if k not in timing} == \
               {k: v for k, v in ref[step].items() if k not in timing}, step


def test_heartbeat_timeout_is_checked_before_joining():
    from k2jax.config import ConfigError
    from k2jax.parallel import distributed

    with pytest.raises(ConfigError, match="--heartbeat-timeout must be a whole number of seconds, at least 3"):
        distributed.initialize(coordinator="localhost:1", num_processes=2, process_id=0, heartbeat_timeout=2)


def test_two_processes_import_a_checkpoint_each_reading_only_its_experts(tmp_path):
    """`k2jax import` in 2 processes, experts split over them (mesh expert=4 over 2 x 2 devices): each process
    reads the replicated tensors and its own half of the experts; the run they write, restored here on one
    device, holds exactly the checkpoint's weights."""
    import jax
    import numpy as np
    from flax import nnx

    from k2jax.generate import load_run
    from k2jax.interop.deepseek_v3 import load_hf_checkpoint, save_hf_checkpoint
    from k2jax.interop.quant import WeightReader

    cfg = load_config(ROOT / "experiments" / "tiny.yaml")
    _, state = init_train_state(cfg)
    hf_dir, run = tmp_path / "hf", tmp_path / "run"
    save_hf_checkpoint(hf_dir, jax.device_get(state["params"]), jax.device_get(state["model_state"]), cfg.model,
                       dtype="fp8")
    tokenizer_lib.ByteTokenizer().save(hf_dir / "tokenizer")
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "k2jax.cli", "import", str(hf_dir), str(run), "--set", "mesh.expert=4",
           "--coordinator", f"localhost:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    names = WeightReader(hf_dir).logical_names()
    experts = [n for n in names if ".mlp.experts." in n]
    assert len(experts) == cfg.model.moe.num_experts * 3 * (cfg.model.num_layers - cfg.model.num_dense_layers)
    reads = json.loads((run / "import.json").read_text())["read_by_process"]
    assert [r["tensors"] for r in reads] == [len(names) - len(experts) // 2] * 2
    _, params, _ = load_hf_checkpoint(hf_dir)
    restored = nnx.to_pure_dict(nnx.state(load_run(run).model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), params)
