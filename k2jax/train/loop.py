"""The training loop: data -> jitted step -> metrics, evaluation and checkpoints.

`train(cfg, resume=...)` is what `k2jax train` runs, in every process of a
multi-process job. A run directory holds config.yaml, the tokenizer,
metrics.jsonl, tb/, checkpoints/ and, at the end, curves.png and summary.json;
process 0 writes all but the checkpoints, which every process writes together.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from pathlib import Path

import jax
import numpy as np
import yaml
from tqdm import tqdm

from k2jax.config import Config, ConfigError, from_dict, to_dict, with_legacy_values
from k2jax.data import corpus as corpus_lib
from k2jax.data import pipeline, prepared, tokenizer as tokenizer_lib
from k2jax.parallel import distributed
from k2jax.parallel.sharding import batch_sharding
from k2jax.train import flops as flops_lib
from k2jax.train.checkpoint import Checkpointer, CheckpointError, PreemptionFlag, finished_steps, saved_config, warn
from k2jax.train.metrics import LoadMonitor, MetricsWriter, plot_run
from k2jax.train.step import abstract_batch, abstract_state, init_train_state, make_eval_step, make_train_step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept. `step`: where."""

    step: int | None = None

    exit_code = 4  # of the CLI


class Preempted(RuntimeError):
    """SIGTERM stopped a run after saving a checkpoint: not finished, --resume continues it."""

    exit_code = 143  # of the CLI: 128 + SIGTERM


# What a resumed run may change: how it executes, how long it runs, what it logs and keeps, and the
# optimizer's settings (not its kind, whose state would not match). Everything else must match the
# checkpoint: the model's math and its data.
_RESUMABLE = {"model.remat", "model.attention_impl", "model.expert_parallel", "model.grouped_matmul",
              "model.expert_buffer_factor", "train.steps", "train.grad_accum", "train.eval_every",
              "train.eval_batches", "train.log_every", "train.progress", "train.out_dir"}


def _resumable(key: str) -> bool:
    section, _, name = key.partition(".")
    return key in _RESUMABLE or section in ("mesh", "checkpoint") or (section == "optim" and name != "name")


def _prepare_run_dir(cfg: Config, resume: bool) -> tuple[Path, Path]:
    """Check train.out_dir before anything is written: a directory or nothing, writable, holding a finished
    checkpoint exactly when resuming."""
    out = Path(cfg.train.out_dir)
    ckpt_dir = out / "checkpoints"
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "train.out_dir is a file, not a directory; choose another "
                                 "train.out_dir", str(out))
    steps = finished_steps(ckpt_dir)
    if resume and not steps:
        raise CheckpointError(f"--resume: {ckpt_dir} holds no checkpoint that finished saving; start the run "
                              f"without --resume")
    if not resume and steps:
        raise ConfigError(f"train.out_dir: {out} already holds checkpoints (steps {steps}); pass --resume to "
                          f"continue it, or set train.out_dir to a new directory (nothing was changed)")
    if distributed.is_primary():
        _check_writable(next(p for p in (out, *out.parents) if p.exists()))
    return out, ckpt_dir


def _check_writable(directory: Path) -> None:
    probe = directory / f".k2jax-write-check-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"cannot write in train.out_dir ({e.strerror})", str(directory)) from e


def _data(cfg: Config, out: Path, resume: bool):
    """(this process's train chunks, held-out chunks, tokenizer) from a prepared or in-memory corpus;
    nothing written."""
    seq_len, shard, shards = cfg.data.seq_len, jax.process_index(), jax.process_count()
    tok_dir = out / "tokenizer"
    if prepared.is_prepared(cfg.data.corpus):
        corpus = prepared.PreparedCorpus(cfg.data.corpus)
        tok = corpus.tokenizer()
        train_chunks, heldout_chunks = corpus.chunks("train", seq_len, shard, shards), corpus.chunks("heldout", seq_len)
    else:
        train_docs, heldout_docs = corpus_lib.load_corpus(cfg.data)
        if resume and tok_dir.exists():
            tok = tokenizer_lib.load(tok_dir)
        else:
            tok = tokenizer_lib.build_tokenizer(cfg.data, train_docs)  # deterministic: the same in every process
        train_chunks = pipeline.chunk_documents(tok, pipeline.shard_documents(train_docs, shard, shards), seq_len)
        heldout_chunks = pipeline.chunk_documents(tok, heldout_docs, seq_len)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tok.vocab_size}); set it to at least {tok.vocab_size}, or leave it "
                          f"unset to take the tokenizer's")
    return train_chunks, heldout_chunks, tok


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_resumed_config(ckpt_dir: Path, cfg: Config) -> None:
    """Refuse a resume whose config changes more than `_resumable` keys, before anything is restored."""
    step, saved = saved_config(ckpt_dir)
    try:
        # keys added since the run started: the value it trained with where known, else today's default
        old = _flat(to_dict(from_dict(Config, with_legacy_values(saved))))
    except ConfigError as e:
        raise CheckpointError(f"--resume: the config saved with step {step} does not load in this version of "
                              f"k2jax ({e})") from e
    new = _flat(to_dict(cfg))
    diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and not _resumable(k)]
    if diff:
        raise ConfigError(f"--resume: these settings differ from the run's (checkpoint step {step}): "
                          f"{'; '.join(diff)}. A resumed run keeps its model, data and optimizer kind (execution, "
                          f"optimizer, length, logging, checkpoint and mesh settings may change); use a new "
                          f"train.out_dir for a new run. Nothing was changed")


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x).tolist(), jax.device_get(tree))


def _layer_max_logits(max_logits: dict) -> list[float]:
    """Per-layer max over heads, in model order (dense layers, then MoE layers)."""
    out = []
    for key in sorted(max_logits, key=_layer_order):
        arr = np.asarray(max_logits[key])
        out.extend(arr.max(axis=-1).reshape(-1).tolist())
    return out


def _layer_order(key: str):
    name, _, idx = key.partition(".")
    return (0 if name.startswith("dense") else 1, int(idx or 0))


def _expert_load(counts: dict) -> dict:
    """Expert load statistics of a step; per-layer lists in model order."""
    if not counts:
        return {}
    loads = np.concatenate([np.reshape(counts[k], (-1, np.shape(counts[k])[-1]))
                            for k in sorted(counts, key=_layer_order)])  # (MoE layers, E)
    mean = np.maximum(loads.mean(axis=-1), 1e-9)
    high, low = loads.max(axis=-1) / mean, loads.min(axis=-1) / mean
    return {"expert_load_min": float(loads.min()), "expert_load_max": float(loads.max()),
            "expert_balance": float(high.mean()),
            "expert_load_max_per_layer": high.tolist(), "expert_load_min_per_layer": low.tolist()}


def evaluate(eval_step, state, batches) -> float:
    total = count = 0.0
    for batch in batches:
        s, c = eval_step(state["params"], state["model_state"], batch)
        total += float(s)
        count += float(c)
    return total / max(count, 1.0)


def train(cfg: Config, *, resume: bool = False) -> dict:
    """Train per `cfg`; returns a summary dict (final/best eval loss, tokens/s, max logit, wall time, ...)."""
    started = time.perf_counter()
    out, ckpt_dir = _prepare_run_dir(cfg, resume)
    if resume:
        _check_resumed_config(ckpt_dir, cfg)
    train_chunks, heldout_chunks, tok = _data(cfg, out, resume)
    primary = distributed.is_primary()

    setup, state = init_train_state(cfg)
    distributed.check_tensor_axis_within_processes(setup.mesh.devices)
    batch_sh = batch_sharding(setup.mesh, (cfg.train.batch_size, cfg.data.seq_len))
    train_iter = pipeline.train_iterator(train_chunks, cfg.data.seq_len,
                                         distributed.local_batch_size(cfg.train.batch_size), seed=cfg.data.seed)
    eval_set = [distributed.from_replicated_host(b, batch_sh) for b in pipeline.fixed_batches(
        heldout_chunks, cfg.data.seq_len, cfg.train.batch_size, cfg.train.eval_batches)]

    if primary:  # the run is accepted: the first writes
        out.mkdir(parents=True, exist_ok=True)
        if not (resume and (out / "tokenizer").exists()):
            tok.save(out / "tokenizer")
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    ckpt = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save, clean=True)
    if resume:
        state, data_state, _ = ckpt.restore(abstract_state(setup, state))
        for unreadable in [s for s in ckpt.all_steps() if s > int(state["step"])]:
            warn(f"moved the unreadable checkpoint to {ckpt.set_aside(unreadable)}; delete it when done with it")
        train_iter.set_state(_own_iterator_state(data_state))

    if primary:
        counts = flops_lib.param_counts(cfg.model)
        print(f"k2jax: {jax.device_count()} x {jax.devices()[0].device_kind}, mesh "
              f"{dict(setup.mesh.shape)}; {counts['total'] / 1e6:.2f}M parameters "
              f"({counts['activated'] / 1e6:.2f}M activated); {_count(train_chunks)} train and "
              f"{_count(heldout_chunks)} held-out sequences of {cfg.data.seq_len} tokens; "
              f"{'resuming at step ' + str(int(state['step'])) if resume else 'starting'}; compiling", flush=True)
    compile_start = time.perf_counter()
    train_step = make_train_step(cfg, setup).lower(state, abstract_batch(cfg, setup.mesh)).compile()
    distributed.wait_for_all("k2jax_train_step_compiled")
    if primary:
        print(f"k2jax: train step compiled in {time.perf_counter() - compile_start:.1f} s", flush=True)
    eval_step = make_eval_step(setup)
    flops_per_token = flops_lib.flops_per_token(cfg.model, cfg.data.seq_len)["total"]
    peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind)
    writer = MetricsWriter(out) if primary else None
    loads = LoadMonitor(cfg.train.steps)
    preempted = PreemptionFlag()

    start = int(state["step"])
    best_eval = math.inf
    summary: dict = {"start_step": start}
    if start >= cfg.train.steps:  # e.g. killed after its last save, before summary.json
        summary["final_eval_loss"] = best_eval = evaluate(eval_step, state, eval_set)
        if primary:
            print(f"k2jax: the checkpoint is at step {start} of train.steps={cfg.train.steps}: nothing to train "
                  f"(raise train.steps to continue); held-out loss {best_eval:.4f}", flush=True)
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not (cfg.train.progress and primary),
               dynamic_ncols=True)
    window_tokens, window_steps, window_start = 0.0, 0, time.perf_counter()
    last_loss = math.nan
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            batch = distributed.from_process_local(next(train_iter), batch_sh)
            state, metrics = train_step(state, batch)
            ckpt.check()
            window_tokens += batch["inputs"].size
            window_steps += 1
            stop = preempted.reached(step - start)  # JAX counts sync steps from each launch
            is_eval = step % cfg.train.eval_every == 0 or step == cfg.train.steps
            is_save = step % cfg.checkpoint.every == 0 or step == cfg.train.steps or stop
            if step % cfg.train.log_every == 0 or is_eval or is_save:
                host = _host(metrics)
                last_loss = host["loss"]
                if not (math.isfinite(last_loss) and host["params_finite"]):
                    raise _diverged(step, last_loss, ckpt)
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / max(elapsed, 1e-9)
                step_time = elapsed / max(window_steps, 1)
                window_tokens, window_steps, window_start = 0.0, 0, time.perf_counter()
                record = _log_record(host, tokens_per_s, flops_per_token, peak)
                record["step_time"] = step_time
                if is_eval:
                    record["eval_loss"] = evaluate(eval_step, state, eval_set)
                    best_eval = min(best_eval, record["eval_loss"])
                    window_start = time.perf_counter()  # evaluation time is not training throughput
                if writer:
                    writer.write(step, record)
                for warning in loads.update(step, record.get("expert_load_max_per_layer", [])):
                    if primary:
                        tqdm.write(warning)
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                                max_logit=f"{record['max_logit']:.1f}", refresh=False)
                summary.update(final_loss=last_loss, tokens_per_s=tokens_per_s,
                               max_logit=max(summary.get("max_logit", -math.inf), record["max_logit"]))
                if "eval_loss" in record:
                    summary["final_eval_loss"] = record["eval_loss"]
                if is_save:
                    data_states = distributed.allgather_json(train_iter.get_state())
                    ckpt.save(step, state, {"processes": data_states}, to_dict(cfg),
                              metrics={"eval_loss": record.get("eval_loss", math.inf)})
            bar.update(1)
            if stop:
                summary["preempted_at"] = step
                break
    except BaseException:
        _close(bar, ckpt, writer, preempted, quiet=True)  # the first error is the one to report
        raise
    _close(bar, ckpt, writer, preempted, quiet=False)

    summary.update(steps=int(state["step"]), best_eval_loss=best_eval, expert_load_max_mean=loads.settled(),
                   wall_time_s=time.perf_counter() - started)  # this invocation only, when resumed
    if not primary:
        return summary
    plot_run(out / "metrics.jsonl", out / "curves.png",
             tau=cfg.optim.qk_clip_tau if cfg.optim.name == "muonclip" else None)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _diverged(step: int, loss: float, ckpt: Checkpointer) -> TrainingDiverged:
    ckpt.wait()  # a save in flight is a good state: every saved step passed this check
    last = ckpt.latest_step()
    kept = (f"the last good checkpoint, step {last}, is kept in {ckpt.directory}" if last is not None else
            "no checkpoint was saved before it")
    error = TrainingDiverged(f"training diverged at step {step} (loss {loss}, or non-finite weights); {kept}. "
                             f"Lower optim.learning_rate or raise optim.warmup_steps"
                             + (" and continue with --resume" if last is not None else ""))
    error.step = step
    return error


def _close(bar, ckpt: Checkpointer, writer, preempted, *, quiet: bool) -> None:
    """Finish the save in flight and close everything; raise the first failure unless `quiet`."""
    errors = []
    for close in (bar.close, ckpt.wait, ckpt.close, writer.close if writer else None, preempted.close):
        try:
            if close is not None:
                close()
        except Exception as e:
            errors.append(e)
    if errors and not quiet:
        raise errors[0]


def _count(chunks) -> str:
    """'1,234' sequences, or '?' for a source that does not know its length."""
    try:
        return f"{len(chunks):,}"
    except TypeError:
        return "?"


def _own_iterator_state(data_state: dict) -> dict:
    """This process's data-iterator state from a checkpoint's per-process list."""
    states = data_state.get("processes", [])
    if len(states) != jax.process_count():
        raise CheckpointError(f"the checkpoint holds data-iterator states of {len(states)} processes, this job has "
                              f"{jax.process_count()}; resume with the process count it was saved with (the "
                              f"mesh shape may change)")
    return states[jax.process_index()]


def _log_record(host: dict, tokens_per_s: float, flops_per_token: float, peak) -> dict:
    per_layer = _layer_max_logits(host["max_logits"])
    record = {
        "loss": host["loss"], "aux_loss": host["aux_loss"], "z_loss": host["z_loss"],
        "grad_norm": host["grad_norm"], "learning_rate": host["learning_rate"],
        "tokens_per_s": tokens_per_s, "max_logit": max(per_layer),
        "max_logit_per_layer": per_layer, "max_logit_per_head": host["max_logits"],
        "dropped_fraction": host["dropped_fraction"],
        **{k: host[k] for k in ("clipped_heads", "min_gamma") if k in host},
        **_expert_load(host["expert_counts"]),
    }
    if peak:
        record["mfu"] = flops_lib.mfu(tokens_per_s, flops_per_token, jax.device_count(), peak)
    return record
