"""Checkpointer (orbax) and metrics writers and FLOPs accounting."""

import dataclasses
import json
import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.config import PRESETS
from k2jax.model import flops
from k2jax.train.checkpoint import Checkpointer, CheckpointError, PreemptionFlag
from k2jax.train.metrics import MetricsWriter, plot_run, read_metrics


def _state(seed=0):
    k = jax.random.key(seed)
    return {"params": {"w": jax.random.normal(k, (4, 3)), "b16": jnp.ones((5,), jnp.bfloat16) * seed},
            "step": jnp.asarray(seed, jnp.int32), "rng": jax.random.key_data(k)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def test_round_trip_async(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, async_save=True)
    state = _state(3)
    ckpt.save(3, state, {"next_index": 17}, {"model": {"d_model": 8}})
    ckpt.wait()
    restored, data, cfg = ckpt.restore(_abstract(state))
    chex.assert_trees_all_equal(restored, state)
    chex.assert_trees_all_equal_dtypes(restored, state)  # bfloat16 leaves come back bfloat16
    assert data == {"next_index": 17} and cfg == {"model": {"d_model": 8}}
    ckpt.close()


def test_keeps_latest_n_plus_best(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    losses = {1: 3.0, 2: 1.0, 3: 2.5, 4: 2.7, 5: 2.9}  # step 2 is the best
    for step, loss in losses.items():
        ckpt.save(step, _state(step), {}, {}, metrics={"eval_loss": loss})
    ckpt.wait()
    assert sorted(ckpt.all_steps()) == [2, 4, 5]
    ckpt.close()


def test_missing_and_corrupt_checkpoints_raise_and_touch_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty").restore(_abstract(_state()))
    ckpt = Checkpointer(tmp_path / "run", async_save=False)
    ckpt.save(1, _state(1), {}, {})
    ckpt.wait()
    files = sorted(p for p in (tmp_path / "run" / "1" / "state").rglob("*") if p.is_file())
    victim = max(files, key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])  # truncate the largest file
    before = {p: p.stat().st_size for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.restore(_abstract(_state()))
    after = {p: p.stat().st_size for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert before == after
    with pytest.raises(CheckpointError, match="step 7"):
        ckpt.restore(_abstract(_state()), step=7)


def test_sigterm_sets_the_preemption_flag():
    flag = PreemptionFlag()
    assert not flag.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.reached(2)
    flag.close()
    assert signal.getsignal(signal.SIGTERM) is not None


def test_metrics_jsonl_tensorboard_and_plot(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in range(1, 6):
        writer.write(step, {"loss": 5.0 / step, "eval_loss": float("nan") if step == 2 else 4.0 / step,
                            "max_logit_per_layer": np.asarray([step * 10.0, step * 20.0]),
                            "max_logit_per_head": {"moe_layers": jnp.ones((1, 4)) * step}})
    writer.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[1]["eval_loss"] is None and records[2]["loss"] == pytest.approx(5 / 3)
    assert records[4]["max_logit_per_head"]["moe_layers"] == [[5.0] * 4]
    assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())
    plot_run(tmp_path / "metrics.jsonl", tmp_path / "curves.png", tau=30.0)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    json.dumps(records)  # everything stayed JSON


def test_flops_accounting():
    cfg = PRESETS["small"]
    f = flops.flops_per_token(cfg, 128)
    g = flops.flops_per_token(cfg, 256)
    assert g["matmul"] == f["matmul"] and g["attention"] == pytest.approx(2 * f["attention"])
    dense = dataclasses.replace(cfg, num_dense_layers=cfg.num_layers)  # no experts: the 6N rule
    counts = flops.analytic_param_counts(dense)
    assert counts["total"] == counts["activated"]
    assert flops.flops_per_token(dense, 1)["matmul"] == 6 * (counts["total"] - cfg.vocab_size * cfg.d_model)
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_per_device("TPU v5 lite") == 197e12 and flops.peak_flops_per_device("cpu") is None
    assert flops.mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)
