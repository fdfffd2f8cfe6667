"""The training loop: data -> jitted step -> metrics, evaluation and checkpoints.

`train(cfg, resume=...)` is what `k2jax train` runs, in every process of a
multi-process job. A run directory holds config.yaml, the tokenizer,
metrics.jsonl, tb/, checkpoints/ and, at the end, curves.png and summary.json;
process 0 writes all but the checkpoints, which every process writes together.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np
import yaml
from tqdm import tqdm

from k2jax.config import Config, ConfigError, to_dict
from k2jax.data import corpus as corpus_lib
from k2jax.data import pipeline, prepared, tokenizer as tokenizer_lib
from k2jax.parallel import distributed
from k2jax.parallel.sharding import batch_sharding
from k2jax.train import flops as flops_lib
from k2jax.train.checkpoint import Checkpointer, CheckpointError, PreemptionFlag
from k2jax.train.metrics import MetricsWriter, plot_run
from k2jax.train.step import abstract_state, init_train_state, make_eval_step, make_train_step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _prepare_run_dir(cfg: Config, resume: bool) -> tuple[Path, Path]:
    out = Path(cfg.train.out_dir)
    ckpt_dir = out / "checkpoints"
    has_ckpt = ckpt_dir.is_dir() and any(ckpt_dir.iterdir())
    if resume and not has_ckpt:
        raise CheckpointError(f"--resume given but {ckpt_dir} holds no checkpoint")
    if not resume and has_ckpt:
        raise ConfigError(f"train.out_dir: {out} already holds checkpoints; pass --resume to continue it, "
                          f"or set train.out_dir to a new directory (nothing was changed)")
    out.mkdir(parents=True, exist_ok=True)
    return out, ckpt_dir


def _data(cfg: Config, out: Path, resume: bool):
    """(this process's train chunks, held-out chunks) from a prepared or in-memory corpus; the
    tokenizer is saved with the run."""
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
    if distributed.is_primary() and not (resume and tok_dir.exists()):
        tok.save(tok_dir)
    return train_chunks, heldout_chunks


def _check_resumed_config(saved: dict, cfg: Config) -> None:
    now = to_dict(cfg)
    for section in ("model", "data"):
        if saved.get(section) != now[section]:
            diff = [k for k in now[section] if saved.get(section, {}).get(k) != now[section][k]]
            raise ConfigError(f"--resume: {section} settings differ from the checkpoint ({', '.join(diff)}); "
                              f"a resumed run must keep the model and data it started with")


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
    if not counts:
        return {}
    loads = np.concatenate([np.asarray(v).reshape(-1, np.asarray(v).shape[-1]) for v in counts.values()])
    mean = loads.mean(axis=-1, keepdims=True)
    return {"expert_load_min": float(loads.min()), "expert_load_max": float(loads.max()),
            "expert_balance": float((loads.max(axis=-1) / np.maximum(mean[:, 0], 1e-9)).mean())}


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
    train_chunks, heldout_chunks = _data(cfg, out, resume)
    primary = distributed.is_primary()
    if primary:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    setup, state = init_train_state(cfg)
    distributed.check_tensor_axis_within_processes(setup.mesh.devices)
    batch_sh = batch_sharding(setup.mesh, (cfg.train.batch_size, cfg.data.seq_len))
    train_iter = pipeline.train_iterator(train_chunks, cfg.data.seq_len,
                                         distributed.local_batch_size(cfg.train.batch_size), seed=cfg.data.seed)
    eval_set = [distributed.from_replicated_host(b, batch_sh) for b in pipeline.fixed_batches(
        heldout_chunks, cfg.data.seq_len, cfg.train.batch_size, cfg.train.eval_batches)]

    ckpt = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    if resume:
        state, data_state, saved_cfg = ckpt.restore(abstract_state(setup, state))
        _check_resumed_config(saved_cfg, cfg)
        train_iter.set_state(_own_iterator_state(data_state))

    train_step = make_train_step(cfg, setup)
    eval_step = make_eval_step(setup)
    flops_per_token = flops_lib.flops_per_token(cfg.model, cfg.data.seq_len)["total"]
    peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind)
    writer = MetricsWriter(out) if primary else None
    preempted = PreemptionFlag()

    start = int(state["step"])
    best_eval = math.inf
    summary: dict = {"start_step": start}
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not (cfg.train.progress and primary),
               dynamic_ncols=True)
    window_tokens, window_steps, window_start = 0.0, 0, time.perf_counter()
    last_loss = math.nan
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            batch = distributed.from_process_local(next(train_iter), batch_sh)
            state, metrics = train_step(state, batch)
            window_tokens += batch["inputs"].size
            window_steps += 1
            stop = preempted.reached(step - start)  # JAX counts sync steps from each launch
            is_eval = step % cfg.train.eval_every == 0 or step == cfg.train.steps
            is_save = step % cfg.checkpoint.every == 0 or step == cfg.train.steps or stop
            if step % cfg.train.log_every == 0 or is_eval or is_save:
                host = _host(metrics)
                last_loss = host["loss"]
                if not (math.isfinite(last_loss) and host["params_finite"]):
                    raise TrainingDiverged(f"loss {last_loss} / non-finite weights at step {step}; stopping. "
                                           f"The last good checkpoint (step {ckpt.latest_step()}) is kept in "
                                           f"{ckpt_dir}")
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
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        if writer:
            writer.close()
        preempted.close()

    summary.update(steps=int(state["step"]), best_eval_loss=best_eval,
                   wall_time_s=time.perf_counter() - started)  # this invocation only, when resumed
    if not primary:
        return summary
    plot_run(out / "metrics.jsonl", out / "curves.png",
             tau=cfg.optim.qk_clip_tau if cfg.optim.name == "muonclip" else None)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


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
