"""The training loop: data -> jitted step -> metrics, evaluation and checkpoints.

`train(cfg, resume=...)` is what `k2jax train` runs, in every process of a
multi-process job, into a run directory (`run_dir`); each logged step's record
is built and written by `metrics`.

`train` runs named set-up phases (run directory, data, state and batches, run
files, restore, compile), then `_Steps`, whose loop follows each train step with
the hooks due at it (divergence check, record, evaluation, the `eval` section's
evaluations, metrics, load monitor, progress bar, summary, checkpoint), then writes the results.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from tqdm import tqdm

from k2jax.config import Config, ConfigError, to_dict
from k2jax.data import corpus as corpus_lib
from k2jax.data import mixture, pipeline, prepared, tokenizer as tokenizer_lib
from k2jax.eval import suite as suite_lib
from k2jax.eval.scoring import ModelParts
from k2jax.model import flops as flops_lib
from k2jax.parallel import distributed
from k2jax.parallel.sharding import batch_sharding
from k2jax.train.checkpoint import Checkpointer, CheckpointError, PreemptionFlag, warn
from k2jax.train.metrics import LoadMonitor, MetricsWriter, Throughput, source_record, step_record
from k2jax.train.run_dir import check_resumed_config, prepare_run_dir, write_results, write_run_files
from k2jax.train.step import (abstract_batch, abstract_state, abstract_train_state, init_train_state, make_eval_step,
                              make_train_step)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept. `step`: where."""

    step: int | None = None

    exit_code = 4  # of the CLI


class Preempted(RuntimeError):
    """SIGTERM stopped a run after saving a checkpoint: not finished, --resume continues it."""

    exit_code = 143  # of the CLI: 128 + SIGTERM


DROP_WARNING = 0.05  # a layer dropping more of its token copies than this is said once

def _data(cfg: Config, out: Path, resume: bool, init_from: str | None):
    """(this process's train chunks (a mixture.Sources for data.sources), held-out chunks, tokenizer, held-out
    texts: None for prepared corpora) from a mixture, a prepared or an in-memory corpus; nothing written.
    The tokenizer is the run's own when resuming, the imported model's with init_from; a prepared corpus
    must have been tokenized with it."""
    seq_len, shard, shards = cfg.data.seq_len, jax.process_index(), jax.process_count()
    tok_dir = out / "tokenizer"
    given = (tokenizer_lib.from_hf_dir(init_from) if init_from else
             tokenizer_lib.load(tok_dir) if resume and tok_dir.exists() else None)
    if cfg.data.sources:
        sources = mixture.Sources(cfg.data.sources, seq_len, shard, shards)
        sources.check_epochs(cfg.train.steps * distributed.local_batch_size(cfg.train.batch_size) * seq_len)
        tok, train_chunks, heldout_chunks, heldout_docs = sources.tokenizer(), sources, sources.heldout_chunks(), None
    elif prepared.is_prepared(cfg.data.corpus):
        corpus = prepared.PreparedCorpus(cfg.data.corpus)
        tok = corpus.tokenizer()
        train_chunks, heldout_chunks = corpus.chunks("train", seq_len, shard, shards), corpus.chunks("heldout", seq_len)
        heldout_docs = None
    else:
        train_docs, heldout_docs = corpus_lib.load_corpus(cfg.data)
        tok = given if given is not None else tokenizer_lib.build_tokenizer(cfg.data, train_docs)  # deterministic
        train_chunks = pipeline.chunk_documents(tok, pipeline.shard_documents(train_docs, shard, shards), seq_len)
        heldout_chunks = pipeline.chunk_documents(tok, heldout_docs, seq_len)
    if given is not None and not tokenizer_lib.same(given, tok):
        whose = f"{init_from}'s" if init_from else "the run's"
        raise ConfigError(f"data: the corpus was tokenized with another tokenizer than {whose} (vocabulary "
                          f"{tok.vocab_size} vs {given.vocab_size}); prepare it with `k2jax prepare ... --tokenizer "
                          f"{init_from or tok_dir}`")
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tok.vocab_size}); set it to at least {tok.vocab_size}, or leave it "
                          f"unset to take the tokenizer's")
    return train_chunks, heldout_chunks, tok, heldout_docs


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x).tolist(), jax.device_get(tree))


def evaluate(eval_step, state, batches) -> float:
    total = count = 0.0
    for batch in batches:
        s, c = eval_step(state["params"], state["model_state"], batch)
        total += float(s)
        count += float(c)
    return total / max(count, 1.0)


def train(cfg: Config, *, resume: bool = False, init_from: str | None = None) -> dict:
    """Train per `cfg`; returns a summary dict (final/best eval loss, tokens/s, max logit, wall time, ...).
    init_from: a Hugging Face DeepSeek-V3 / Kimi-K2 directory whose weights a new run starts from.

    The set-up phases, in this order in every process, then the steps (`_Steps`), then the results."""
    started = time.perf_counter()
    out, ckpt_dir = prepare_run_dir(cfg, resume)
    if resume:
        check_resumed_config(ckpt_dir, cfg)
    train_chunks, heldout_chunks, tok, heldout_docs = _data(cfg, out, resume, init_from)
    suite = _eval_suite(cfg, tok, heldout_docs)
    setup, state = _initial_state(cfg, resume, init_from)
    distributed.check_tensor_axis_within_processes(setup.mesh.devices)
    batches = _batches(cfg, setup, train_chunks, heldout_chunks)
    if distributed.is_primary():  # the run is accepted: the first writes
        write_run_files(cfg, out, tok, resume)
    ckpt = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save, clean=True)
    if resume:
        state = _restore(ckpt, setup, state, batches.train)
    if distributed.is_primary():
        _announce(cfg, setup, state, resume, train_chunks, heldout_chunks)
    train_step = _compile(cfg, setup, state)

    summary = _Steps(cfg, out, ckpt, batches, train_step, make_eval_step(setup), state,
                     _eval_runner(cfg, setup, suite)).run()
    summary["wall_time_s"] = time.perf_counter() - started  # this invocation only, when resumed
    if distributed.is_primary():
        write_results(cfg, out, summary)
    return summary


def _initial_state(cfg: Config, resume: bool, init_from: str | None):
    """(setup, state): imported weights with a fresh optimizer, the abstract state a resume restores into,
    or a random initialisation."""
    if init_from:
        from k2jax.interop.importer import initial_state

        setup, state, stats = initial_state(cfg, init_from, log=print if distributed.is_primary() else lambda _: None)
        if distributed.is_primary():
            print(f"k2jax: imported {init_from}: {stats.line()}", flush=True)
        return setup, state
    return abstract_train_state(cfg) if resume else init_train_state(cfg)


def _eval_suite(cfg: Config, tok, heldout_docs) -> suite_lib.Suite | None:
    """The `eval` section's text sets and tasks, read and tokenized (None when it names none)."""
    if not cfg.eval.enabled:
        return None
    suite = suite_lib.Suite.build(tok, cfg.data.seq_len, texts=list(cfg.eval.bits_per_byte), tasks=list(cfg.eval.tasks),
                                  heldout=heldout_docs, max_bytes=cfg.eval.max_bytes, max_items=cfg.eval.max_items,
                                  where=("eval.bits_per_byte", "eval.tasks"))
    if suite.qa_tasks:
        raise ConfigError(f"eval.tasks: {', '.join(suite.qa_tasks)} are generative QA tasks, which the training loop "
                          f"does not run; run them on a checkpoint with `k2jax eval RUN_DIR --tasks ...`")
    return suite


def _eval_runner(cfg: Config, setup, suite: suite_lib.Suite | None) -> Callable[[dict], dict] | None:
    """state -> the suite's eval/... metrics, scored on the run's mesh in batches of one micro-batch's rows
    (train.batch_size / train.grad_accum, which split over the data axes) of data.seq_len tokens."""
    if suite is None:
        return None
    rows = cfg.train.batch_size // cfg.train.grad_accum
    return lambda state: suite_lib.metrics(suite.run(
        ModelParts(setup.graphdef, state["params"], state["model_state"], setup.mesh), rows))


class _Batches(NamedTuple):
    """A run's data, as the steps take it."""

    sharding: NamedSharding  # of a global (train.batch_size, data.seq_len) batch
    train: Any  # this process's endless train-batch iterator (grain: get_state, set_state)
    held_out: list  # the fixed held-out batches, on device


def _batches(cfg: Config, setup, train_chunks, heldout_chunks) -> _Batches:
    """The batch layout over the mesh, the train iterator and the held-out batches on device."""
    sharding = batch_sharding(setup.mesh, (cfg.train.batch_size, cfg.data.seq_len))
    rows = distributed.local_batch_size(cfg.train.batch_size)
    train_iter = (train_chunks.iterator(rows, cfg.data.seed) if isinstance(train_chunks, mixture.Sources) else
                  pipeline.train_iterator(train_chunks, cfg.data.seq_len, rows, seed=cfg.data.seed))
    held_out = [distributed.from_replicated_host(b, sharding) for b in pipeline.fixed_batches(
        heldout_chunks, cfg.data.seq_len, cfg.train.batch_size, cfg.train.eval_batches)]
    return _Batches(sharding, train_iter, held_out)


def _restore(ckpt: Checkpointer, setup, state: dict, train_iter) -> dict:
    """The newest readable checkpoint's state, with the data iterator moved to where it was; newer, unreadable
    checkpoints are set aside."""
    state, data_state, _ = ckpt.restore(abstract_state(setup, state))
    for unreadable in [s for s in ckpt.all_steps() if s > int(state["step"])]:
        warn(f"moved the unreadable checkpoint to {ckpt.set_aside(unreadable)}; delete it when done with it")
    if "imported_from" not in data_state:  # an imported checkpoint (k2jax import): the data starts at its beginning
        train_iter.set_state(_own_iterator_state(data_state))
    return state


def _announce(cfg: Config, setup, state: dict, resume: bool, train_chunks, heldout_chunks) -> None:
    counts = flops_lib.analytic_param_counts(cfg.model)
    print(f"k2jax: {jax.device_count()} x {jax.devices()[0].device_kind}, mesh "
          f"{dict(setup.mesh.shape)}; {counts['total'] / 1e6:.2f}M parameters "
          f"({counts['activated'] / 1e6:.2f}M activated); {_count(train_chunks)} train and "
          f"{_count(heldout_chunks)} held-out sequences of {cfg.data.seq_len} tokens; "
          f"{'resuming at step ' + str(int(state['step'])) if resume else 'starting'}; compiling", flush=True)


def _compile(cfg: Config, setup, state: dict):
    """The compiled train step, once every process has compiled it."""
    compile_start = time.perf_counter()
    train_step = make_train_step(cfg, setup).lower(state, abstract_batch(cfg, setup.mesh)).compile()
    distributed.wait_for_all("k2jax_train_step_compiled")
    if distributed.is_primary():
        print(f"k2jax: train step compiled in {time.perf_counter() - compile_start:.1f} s", flush=True)
    return train_step


class _Steps:
    """The train steps of one launch. After each step the hooks due at it (`_due`) run in `hooks` order;
    a new per-step concern is a method and an entry there."""

    def __init__(self, cfg: Config, out: Path, ckpt: Checkpointer, batches: _Batches, train_step, eval_step,
                 state: dict, run_evals: Callable[[dict], dict] | None = None):
        self.cfg, self.ckpt, self.batches, self.state = cfg, ckpt, batches, state
        self.train_step, self.eval_step, self.run_evals = train_step, eval_step, run_evals
        self.primary = distributed.is_primary()
        self.flops_per_token = flops_lib.flops_per_token(cfg.model, cfg.data.seq_len)["total"]
        self.peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind)
        self.writer = MetricsWriter(out) if self.primary else None
        self.loads = LoadMonitor(cfg.train.steps)
        self.dropping: set[int] = set()  # MoE layers already warned about dropped token copies
        self.preempted = PreemptionFlag()
        self.start = int(state["step"])
        self.best_eval = math.inf
        self.summary: dict = {"start_step": self.start}
        if self.start >= cfg.train.steps:  # e.g. killed after its last save, before summary.json
            self._nothing_to_train()
        self.bar = tqdm(total=cfg.train.steps, initial=self.start,
                        disable=not (cfg.train.progress and self.primary), dynamic_ncols=True)
        self.throughput = Throughput()
        self.hooks: list[tuple[str, Callable[[_StepInfo], None]]] = [  # (when: a key of `_due`, what)
            ("log", self._check_finite),
            ("log", self._record),
            ("eval", self._evaluate),
            ("evals", self._run_evals),
            ("log", self._write),
            ("log", self._watch_loads),
            ("log", self._show_progress),
            ("log", self._summarize),
            ("save", self._save),
        ]

    def run(self) -> dict:
        """Train to train.steps, or until preempted; the summary, but for its wall time."""
        try:
            for step in range(self.start + 1, self.cfg.train.steps + 1):
                stop = self._step(step)
                self.bar.update(1)
                if stop:
                    self.summary["preempted_at"] = step
                    break
        except BaseException:
            self._close(quiet=True)  # the first error is the one to report
            raise
        self._close(quiet=False)
        self.summary.update(steps=int(self.state["step"]), best_eval_loss=self.best_eval,
                            expert_load_max_mean=self.loads.settled())
        return self.summary

    def _step(self, step: int) -> bool:
        """Train step `step`, then its due hooks; whether to stop (preempted, saved) after it."""
        batch = distributed.from_process_local(next(self.batches.train), self.batches.sharding)
        self.state, metrics = self.train_step(self.state, batch)
        self.ckpt.check()
        self.throughput.count(batch["inputs"].size)
        stop = self.preempted.reached(step - self.start)  # JAX counts sync steps from each launch
        info = _StepInfo(step, self.state, metrics)
        due = _due(self.cfg, step, stop)
        for when, hook in self.hooks:
            if when in due:
                hook(info)
        return stop

    def _nothing_to_train(self) -> None:
        self.summary["final_eval_loss"] = self.best_eval = evaluate(self.eval_step, self.state,
                                                                    self.batches.held_out)
        if self.primary:
            print(f"k2jax: the checkpoint is at step {self.start} of train.steps={self.cfg.train.steps}: nothing "
                  f"to train (raise train.steps to continue); held-out loss {self.best_eval:.4f}", flush=True)

    def _check_finite(self, info: _StepInfo) -> None:
        """Raise TrainingDiverged at a non-finite loss or weights."""
        if not (math.isfinite(info.host["loss"]) and info.host["params_finite"]):
            raise _diverged(info.step, info.host["loss"], self.ckpt)

    def _record(self, info: _StepInfo) -> None:
        """The step's metrics, the throughput since the last record and MFU, into the record."""
        tokens_per_s, step_time = self.throughput.measure()
        info.record.update(step_record(info.host, tokens_per_s, self.flops_per_token, self.peak),
                           step_time=step_time)
        if isinstance(self.batches.train, mixture.MixtureIterator):
            info.record.update(source_record(self.cfg, self.batches.train))

    def _evaluate(self, info: _StepInfo) -> None:
        """The held-out loss, into the record."""
        info.record["eval_loss"] = evaluate(self.eval_step, info.state, self.batches.held_out)
        self.best_eval = min(self.best_eval, info.record["eval_loss"])
        self.throughput.restart()  # evaluation time is not training throughput

    def _run_evals(self, info: _StepInfo) -> None:
        """The `eval` section's bits per byte and task accuracies, into the record and (the last) the summary."""
        results = self.run_evals(info.state)
        info.record.update(results)
        self.summary.update(results)
        self.throughput.restart()  # evaluation time is not training throughput

    def _write(self, info: _StepInfo) -> None:
        """The record, to metrics.jsonl and TensorBoard (process 0). A write that fails (a full disk) stops the
        run at this step, before its save: see `_write_failed`."""
        if self.writer:
            try:
                self.writer.write(info.step, info.record)
            except OSError as e:
                raise _write_failed(e, info.step, self.writer.path.parent, self.ckpt) from e

    def _watch_loads(self, info: _StepInfo) -> None:
        """Warn when an MoE layer keeps sending one expert far more than the mean load, and when a bounded
        expert exchange first drops more than DROP_WARNING of a layer's token copies."""
        warnings = self.loads.update(info.step, info.record.get("expert_load_max_per_layer", []))
        for layer, dropped in enumerate(info.record.get("dropped_fraction_per_layer", [])):
            if dropped > DROP_WARNING and layer not in self.dropping:
                self.dropping.add(layer)
                warnings.append(f"warning: MoE layer {layer} dropped {dropped:.1%} of its token copies at step "
                                f"{info.step} (execution.expert_buffer_factor={self.cfg.execution.expert_buffer_factor:g}"
                                f"): raise the factor, or set 0 for a dropless exchange")
        for warning in warnings:
            if self.primary:
                tqdm.write(warning, file=sys.stderr)  # beside the other warnings, clear of the progress bar

    def _show_progress(self, info: _StepInfo) -> None:
        record = info.record
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                             max_logit=f"{record['max_logit']:.1f}", refresh=False)

    def _summarize(self, info: _StepInfo) -> None:
        record = info.record
        self.summary.update(final_loss=record["loss"], tokens_per_s=record["tokens_per_s"],
                            max_logit=max(self.summary.get("max_logit", -math.inf), record["max_logit"]))
        if "eval_loss" in record:
            self.summary["final_eval_loss"] = record["eval_loss"]

    def _save(self, info: _StepInfo) -> None:
        """A checkpoint, written by every process, with each one's data-iterator state."""
        data_states = distributed.allgather_json(self.batches.train.get_state())
        self.ckpt.save(info.step, info.state, {"processes": data_states}, to_dict(self.cfg),
                       metrics={"eval_loss": info.record.get("eval_loss", math.inf)})

    def _close(self, *, quiet: bool) -> None:
        """Finish the save in flight and close everything; raise the first failure unless `quiet`."""
        errors = []
        for close in (self.bar.close, self.ckpt.wait, self.ckpt.close, self.writer.close if self.writer else None,
                      self.preempted.close):
            try:
                if close is not None:
                    close()
            except Exception as e:
                errors.append(e)
        if errors and not quiet:
            raise errors[0]


@dataclasses.dataclass
class _StepInfo:
    """A finished train step, as the hooks see it."""

    step: int
    state: dict
    metrics: dict  # on device
    record: dict = dataclasses.field(default_factory=dict)  # its metrics.jsonl row, built by the hooks

    @functools.cached_property
    def host(self) -> dict:
        """The metrics as Python values, copied from the device on first use."""
        return _host(self.metrics)


def _due(cfg: Config, step: int, stop: bool) -> set[str]:
    """The hooks to run after `step`: "eval", "evals" (the `eval` section, when it names anything) and "save" at
    their cadence and at the last step ("save" also when stopping); "log" at train.log_every and whenever any of
    them runs."""
    due = set()
    if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
        due.add("eval")
    if cfg.eval.enabled and (step % (cfg.eval.every or cfg.train.eval_every) == 0 or step == cfg.train.steps):
        due.add("evals")
    if step % cfg.checkpoint.every == 0 or step == cfg.train.steps or stop:
        due.add("save")
    if step % cfg.train.log_every == 0 or due:
        due.add("log")
    return due


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


def _write_failed(e: OSError, step: int, out: Path, ckpt: Checkpointer) -> OSError:
    """The one-line error of a metrics write that failed at `step`: the run stops there and saves nothing more
    (not on a full disk); the save in flight is finished first (or, failing too, its partial directory removed),
    so the message names the checkpoint that is left."""
    try:
        ckpt.wait()
        left = ckpt.remains()
    except (OSError, CheckpointError) as save_error:  # the same disk; it names what is left
        left = f"the save in flight failed too: {save_error}"
    return OSError(e.errno, f"writing the metrics of step {step} to {e.filename or out} failed: {e.strerror or e}; "
                            f"the run stopped at step {step} and saved nothing more; {left}")


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
