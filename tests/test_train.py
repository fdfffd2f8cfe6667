"""The training path end to end: smoke run, kill-and-resume equivalence, errors, metrics."""

import contextlib
import io
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from k2jax.config import ConfigError, load_config
from k2jax.train.checkpoint import CheckpointError
from k2jax.train.loop import train

ROOT = Path(__file__).parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"


def _cfg(out_dir, *extra):
    return load_config(TINY, [f"train.out_dir={out_dir}", "train.progress=false", "train.log_every=1",
                              "checkpoint.async_save=false", *extra])


def _losses(run_dir) -> dict[int, float]:
    """step -> loss, keeping the last record of each step (a resumed run re-logs replayed steps)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = train(_cfg(out))
    (out.parent / "ref_stdout.txt").write_text(printed.getvalue())
    return out, summary


def test_smoke_loss_falls_and_artifacts(reference_run):
    out, summary = reference_run
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 21))
    assert losses[20] < losses[1] - 0.5, losses
    assert math.isfinite(summary["final_eval_loss"])
    assert 1 <= summary["expert_load_max_mean"] < 3  # quantile balancing keeps the tiny run balanced
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "summary.json", "tokenizer"):
        assert (out / name).exists(), name
    assert list((out / "tb").iterdir())
    printed = (out.parent / "ref_stdout.txt").read_text().splitlines()  # what happens before step 1 is said
    assert printed[0].startswith("k2jax: 1 x cpu") and "parameters" in printed[0] and "compiling" in printed[0]
    assert printed[1].startswith("k2jax: train step compiled in")


def test_metrics_fields(reference_run):
    out, _ = reference_run
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    required = {"step", "loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time", "max_logit",
                "max_logit_per_layer", "max_logit_per_head", "clipped_heads", "min_gamma", "expert_load_min",
                "expert_load_max", "expert_balance", "expert_load_max_per_layer", "expert_load_min_per_layer",
                "aux_loss", "z_loss"}
    for rec in records:
        assert required <= set(rec), required - set(rec)
        assert len(rec["max_logit_per_layer"]) == 2
        assert len(rec["expert_load_max_per_layer"]) == len(rec["expert_load_min_per_layer"]) == 1
        assert rec["expert_load_min_per_layer"][0] <= 1 <= rec["expert_load_max_per_layer"][0]
        assert set(rec["max_logit_per_head"]) == {"dense_layers", "moe_layers"}
    assert any("eval_loss" in rec for rec in records)


def test_kill_and_resume_matches_uninterrupted(reference_run, tmp_path):
    """SIGTERM a training process after its first checkpoint, resume it, compare every loss."""
    ref_dir, _ = reference_run
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "k2jax.cli", "train", str(TINY), "--set", f"train.out_dir={out}",
            "--set", "train.progress=false", "--set", "train.log_every=1", "--set", "checkpoint.every=5",
            "--set", "train.steps=20"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(_losses(out)) >= 7:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    output = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == 143 and "continue with --resume" in output, output  # saved, then 128 + SIGTERM
    stopped_at = max(_losses(out))
    assert stopped_at < 20, "the run finished before it could be interrupted"
    resumed = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    ref, got = _losses(ref_dir), _losses(out)
    assert sorted(got) == list(range(1, 21))
    for step in range(1, 21):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), (step, got[step], ref[step])


def test_existing_run_needs_resume_and_missing_checkpoint_is_clear(reference_run, tmp_path):
    out, _ = reference_run
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="--resume"):
        train(_cfg(out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(_cfg(tmp_path / "fresh"), resume=True)


def test_bad_inputs_fail_early(tmp_path):
    with pytest.raises(ConfigError, match="train.grad_accum"):
        _cfg(tmp_path, "train.grad_accum=3")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="(?i)empty|no text|no documents"):
        train(_cfg(tmp_path / "run", f"data.corpus={empty}"))
    with pytest.raises(ConfigError, match="model.vocab_size"):
        train(_cfg(tmp_path / "run2", "model.vocab_size=100"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    import jax
    import numpy as np

    from k2jax.train.checkpoint import Checkpointer
    from k2jax.train.step import abstract_state, init_train_state

    cfg = _cfg(tmp_path / "nan", "optim.name=adamw", "optim.learning_rate=1e30", "optim.grad_clip_norm=0",
               "optim.warmup_steps=0", "checkpoint.every=1")
    with pytest.raises(Exception, match="(?i)non-finite|nan|inf"):
        train(cfg)
    ckpt = Checkpointer(tmp_path / "nan" / "checkpoints")
    steps = ckpt.all_steps()
    setup, fresh = init_train_state(cfg)
    if steps:  # whatever was kept must be a good (finite) state
        state, _, _ = ckpt.restore(abstract_state(setup, fresh))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    assert max(steps, default=0) < cfg.train.steps


def test_resuming_a_finished_run_trains_nothing_and_says_so(reference_run, tmp_path, capsys):
    import shutil

    from k2jax.cli import main

    out, summary = reference_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main(["train", str(TINY), "--resume", "--set", f"train.out_dir={copy}", "--set", "train.progress=false",
                 "--set", "train.log_every=1", "--set", "train.eval_every=10", "--set", "checkpoint.every=10"]) == 0
    printed = capsys.readouterr().out
    assert "the checkpoint is at step 20 of train.steps=20: nothing to train" in printed
    assert "done: 20 steps (0 in this launch), eval loss" in printed and "nan" not in printed
    assert _losses(copy) == _losses(out)  # no step was trained or logged again


def test_cli_train_and_info(tmp_path):
    from k2jax.cli import main

    assert main(["info", "--config", "tiny", "--params"]) == 0
    assert main(["train", str(TINY), "--set", "train.stpes=3"]) == 2


def test_gradient_accumulation_matches_one_big_batch():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from k2jax.train.step import init_train_state, make_train_step

    batch = None
    results = []
    for accum in (1, 4):
        cfg = _cfg("unused", f"train.grad_accum={accum}", "model.compute_dtype=float32", "optim.warmup_steps=0")
        setup, state = init_train_state(cfg)
        if batch is None:
            rng = np.random.default_rng(0)
            seg = np.repeat(np.asarray([[1] * 40 + [2] * 20 + [0] * 4]), 8, 0).astype(np.int32)
            batch = {"inputs": jnp.asarray(rng.integers(3, 259, (8, 64)), jnp.int32),
                     "targets": jnp.asarray(rng.integers(3, 259, (8, 64)), jnp.int32),
                     "segment_ids": jnp.asarray(seg),
                     "positions": jnp.asarray(np.where(seg == 2, np.arange(64) - 40, np.arange(64)) * (seg > 0),
                                              jnp.int32)}
        step = make_train_step(cfg, setup)
        for _ in range(2):
            state, metrics = step(state, batch)
        results.append((state, metrics))
    (a, ma), (b, mb) = results
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-5),
                 a["params"], b["params"])
    # Quantile Balancing's histograms add up over micro-batches: the same router bias
    bias_a, bias_b = (np.asarray(s["model_state"]["moe_layers"]["ffn"]["bias"]) for s in (a, b))
    assert np.abs(bias_a).max() > 1e-3
    np.testing.assert_allclose(bias_a, bias_b, atol=1e-3)
    np.testing.assert_allclose(np.asarray(ma["stats"].max_logits["moe_layers"]),
                               np.asarray(mb["stats"].max_logits["moe_layers"]),
                               rtol=1e-5)


def test_load_run_restores_the_trained_model_and_greedy_sampling_matches_brute_force(reference_run):
    import jax.numpy as jnp
    import numpy as np

    from batches import eval_batches
    from k2jax.data import corpus as corpus_lib
    from k2jax.generate import load_run
    from k2jax.inference.engine import SamplingParams
    from k2jax.inference.reference import recompute_greedy
    from k2jax.train.step import token_losses

    out, summary = reference_run
    run = load_run(out)
    assert run.step == 20
    # the restored model, called directly, reproduces the held-out loss the run logged at its last step
    _, heldout = corpus_lib.load_corpus(run.config.data)
    nll, count = 0.0, 0.0
    for b in eval_batches(run.config.data, run.tokenizer, heldout, run.config.train.batch_size,
                          run.config.train.eval_batches):
        logits, _ = run.model(jnp.asarray(b["inputs"]), jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"]))
        s, c = token_losses(logits, jnp.asarray(b["targets"]), jnp.asarray(b["segment_ids"] > 0, jnp.float32))
        nll, count = nll + float(s), count + float(c)
    assert nll / count == pytest.approx(summary["final_eval_loss"], abs=1e-3)  # eager vs jitted bf16 rounding
    # greedy full recomputation in one compiled loop == extending the sequence one argmax at a time,
    # and the cached engine's greedy text is the same
    prompt = np.concatenate([[run.tokenizer.bos_id], run.tokenizer.encode("def ")])
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(jnp.argmax(run.model(jnp.asarray([ids], jnp.int32))[0][0, -1][:run.tokenizer.vocab_size])))
    assert recompute_greedy(run.model, [prompt], 6, run.tokenizer.vocab_size)[0].tolist() == ids[len(prompt):]
    cached = run.generate(["def "], max_tokens=6, temperature=0.0, ignore_eos=True)[0]
    assert cached.token_ids == ids[len(prompt):] and cached.text == run.tokenizer.decode(ids[len(prompt):])
    text = run.complete("import ", 8, temperature=1.0, top_k=5, seed=3)
    assert isinstance(text, str) and text == run.complete("import ", 8, temperature=1.0, top_k=5, seed=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        recompute_greedy(run.model, [prompt], run.config.model.max_seq_len)
    with pytest.raises(ValueError, match="exceeds this engine's max_len"):
        run.generate(["def "], max_tokens=run.config.model.max_seq_len)
    # after warm_up no request compiles: the cache stays placed as the programs return it, every span is built
    from k2jax.inference.engine import _prefill, decode_chunk_program

    engine = run.engine(max_batch=2, max_len=128)
    assert engine.warm_up() == 4  # spans 16, 32, 64, 128
    programs = _prefill._cache_size(), decode_chunk_program._cache_size()
    for prompt in ("def ", "import os"):  # one at a time: a prefill of 2 prompts is another (batch) bucket
        engine.generate([prompt], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    assert (_prefill._cache_size(), decode_chunk_program._cache_size()) == programs
    with pytest.raises(CheckpointError, match="not a run directory"):
        load_run(out / "tokenizer")


def test_bench_times_each_optimizer_on_the_same_step():
    from k2jax.tools.bench import bench, format_table, optimizer_variants

    cfg = load_config(TINY, ["train.batch_size=4", "data.seq_len=32"])
    rows = bench(optimizer_variants(cfg, ("muonclip", "adamw")), steps=2, warmup=0)
    assert [r["variant"] for r in rows] == ["muonclip", "adamw"]
    assert rows[0]["ratio"] == 1.0 and all(r["step_s"] > 0 and r["compile_s"] > 0 for r in rows)
    assert rows[1]["ratio"] == pytest.approx(rows[1]["step_s"] ** -1 * rows[0]["step_s"])
    assert all(r["tokens_per_s"] == pytest.approx(4 * 32 / r["step_s"]) for r in rows)
    assert rows[0]["mfu"] is None  # no published peak for a CPU
    assert rows[0]["newton_schulz_flops"] > 0 and rows[1]["newton_schulz_flops"] == 0  # AdamW has none
    table = format_table(rows, cfg)
    assert "muonclip/this" in table and "adamw" in table and "Newton-Schulz FLOPs/step" in table


def test_bench_compare_times_values_of_one_key(capsys, tmp_path):
    from k2jax.cli import main

    small = ["--set", "train.batch_size=4", "--set", "data.seq_len=32", "--steps", "1", "--warmup", "0"]
    profile = tmp_path / "profile"
    assert main(["bench", str(TINY), "--compare", "execution.grouped_matmul=ragged_dot,tiled", *small,
                 "--profile", str(profile)]) == 0
    table = capsys.readouterr().out
    assert "ragged_dot/this" in table and "\ntiled " in table
    assert list(profile.rglob("*.xplane.pb")), "no profiler trace written"
    assert main(["bench", str(TINY), "--compare", "execution.grouped_matmul", *small]) == 2  # no values
    assert main(["bench", str(TINY), "--compare", "execution.grouped_matmul=ragged,tiled", *small]) == 2  # bad value
    assert "not one of" in capsys.readouterr().err


def test_export_writes_a_model_transformers_loads_and_sample_warns_past_the_trained_length(
        reference_run, tmp_path, capsys):
    import dataclasses

    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx
    from transformers import DeepseekV3ForCausalLM

    from k2jax.cli import main
    from k2jax.generate import load, load_run
    from k2jax.interop.deepseek_v3 import load_hf_checkpoint
    from k2jax.model.transformer import Transformer

    out, _ = reference_run
    hf_dir = tmp_path / "hf"
    assert main(["export", str(out), str(hf_dir)]) == 0
    assert f"step 20 of {out} -> {hf_dir}" in capsys.readouterr().out
    assert (hf_dir / "tokenizer" / "tokenizer_kind.json").is_file()
    run = load_run(out)
    _, params, _ = load_hf_checkpoint(hf_dir)
    np.testing.assert_array_equal(params["lm_head"], np.asarray(nnx.to_pure_dict(nnx.state(run.model, nnx.Param))["lm_head"]))
    # transformers computes the run's logits from the exported directory
    hf = DeepseekV3ForCausalLM.from_pretrained(hf_dir).float().eval()
    ids = run.prompt_ids("def add(a, b):\n    return")
    with torch.no_grad():
        expected = hf(torch.as_tensor(ids[None].astype(np.int64))).logits.numpy()
    model32 = Transformer(dataclasses.replace(run.config.model, compute_dtype="float32"), nnx.Rngs(0))
    nnx.update(model32, nnx.state(run.model))
    np.testing.assert_allclose(np.asarray(model32(jnp.asarray(ids[None], jnp.int32))[0]), expected,
                               rtol=2e-4, atol=2e-4)
    # greedy KV-cached generation from the exported directory == transformers' generate, token for token
    hf_run = load(hf_dir, compute_dtype="float32")
    ours = hf_run.generate([ids.tolist()], max_tokens=48, temperature=0.0, ignore_eos=True)[0].token_ids
    padded_vocab = list(range(run.tokenizer.vocab_size, run.config.model.vocab_size))  # ids no tokenizer has
    with torch.no_grad():
        theirs = hf.generate(torch.as_tensor(ids[None].astype(np.int64)), max_new_tokens=48, min_new_tokens=48,
                             do_sample=False, suppress_tokens=padded_vocab, eos_token_id=None,
                             pad_token_id=run.tokenizer.pad_id)[0, len(ids):].tolist()
    assert ours == theirs
    assert main(["export", str(out), str(hf_dir)]) == 2  # never writes into an existing export
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path), str(tmp_path / "hf2")]) == 3  # not a run directory: a checkpoint error
    assert main(["sample", str(tmp_path)]) == 3
    assert f"k2jax sample: {tmp_path} is not a run directory (no config.yaml)" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists()
    # the run trained on rows of 64 tokens (data.seq_len): sampling past them says so
    assert main(["sample", str(out), "--prompt", "def ", "--tokens", "70", "--temperature", "0"]) == 0
    assert "reaches position 75, past the 64 tokens per row the model trained on" in capsys.readouterr().err
