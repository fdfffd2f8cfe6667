"""Import a released DeepSeek-V3 / Kimi-K2 checkpoint (bf16, FP8 block-scaled, int4 pack-quantized experts)
into a sharded run, tensor by tensor: `k2jax import HF_DIR RUN_DIR` and `k2jax train --init-from HF_DIR`.

Each k2jax weight is placed straight into its sharding on the run's mesh: for every group of this
process's devices that hold the same layers/experts of a weight, the HF tensors of those layers/experts
are read once (dequantized to float32), sliced per device and sent there; a block bigger than `budget`
is built in pieces into a buffer on the device. So a process reads only what its devices hold, and the
host holds about one HF tensor (float32) plus one block at a time, whatever the model's size.

Before anything is read or written, every tensor name and shape is checked against the model (one line
naming the first that is missing, mis-shaped or unexpected); the multi-token-prediction layers that V3
and K2 ship are skipped, with a line saying so. `import_run` writes into a temporary directory next to
RUN_DIR and renames it when complete, so an interrupted import leaves no run behind.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.config import Config, ConfigError, load_config
from k2jax.config.load import parse_overrides, read_yaml, to_dict
from k2jax.interop import hf_layout
from k2jax.interop.deepseek_v3 import InteropError, check_checkpoint, config_from_hf, mtp_layers
from k2jax.interop.quant import WeightReader

# model settings a run may choose for itself; everything else about the model comes from config.json
RUN_MODEL_FIELDS = ("compute_dtype", "param_dtype", "scan_layers", "max_seq_len")
BLOCK_BYTES = 64 << 20  # the largest host block sent to a device in one piece (at least one HF tensor)


def hf_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise InteropError(f"{directory} is not a Hugging Face model directory (no config.json)")
    return json.loads(path.read_text())


def run_config(hf_dir: str | Path, path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """A run's config whose model is HF_DIR's config.json; the YAML `path` and `--set` overrides set the rest
    (and only the model's RUN_MODEL_FIELDS)."""
    for where, raw in (("--set", parse_overrides(list(overrides))), (str(path), read_yaml(Path(path)) if path else {})):
        model = (raw or {}).get("model") or {}
        fixed = sorted(k for k in model if k not in RUN_MODEL_FIELDS)
        if fixed:
            raise ConfigError(f"{where}: model.{fixed[0]} comes from {Path(hf_dir) / 'config.json'} when importing; "
                              f"a run may set only model.{{{', '.join(RUN_MODEL_FIELDS)}}}")
    base = {"model": to_dict(config_from_hf(hf_config(hf_dir)))}
    return load_config(path, list(overrides), base=base)


@dataclasses.dataclass
class ImportStats:
    """What an import read: tensors, bytes as stored, formats, skipped MTP tensors, seconds."""

    tensors: int = 0
    stored_bytes: int = 0
    formats: dict = dataclasses.field(default_factory=collections.Counter)
    skipped: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.formats.items()))
        return (f"{self.tensors:,} tensors ({kinds}), {self.stored_bytes / 2**30:.2f} GiB as stored, "
                f"in {self.seconds:.1f} s")


class _CountingReader:
    """The checkpoint's float32 tensors, counting what is read."""

    def __init__(self, reader: WeightReader, stats: ImportStats):
        self.reader, self.stats = reader, stats

    def __call__(self, name: str) -> np.ndarray:
        self.stats.tensors += 1
        self.stats.stored_bytes += sum(self.reader.files.nbytes(s) for s in self.reader.stored_names(name))
        self.stats.formats[self.reader.stored_format(name)] += 1
        return self.reader.read(name, np.float32)


def import_weights(reader: WeightReader, cfg: Config, abstract: dict, hf: dict,
                   log: Callable[[str], None] = print) -> tuple[dict, dict, ImportStats]:
    """(params, model_state, stats): the checkpoint's weights as jax Arrays in the shardings of `abstract`
    (the run's abstract state: ShapeDtypeStructs with shardings)."""
    started = time.perf_counter()
    fused, skipped = check_checkpoint(cfg.model, reader.shapes(), mtp_layers(hf))
    if skipped:
        layers = sorted({int(n.split(".")[2]) for n in skipped})
        log(f"k2jax import: skipping the multi-token-prediction layer{'s' * (len(layers) > 1)} "
            f"{', '.join(map(str, layers))} ({len(skipped)} tensors): k2jax trains next-token prediction only")
    stats = ImportStats(skipped=skipped)
    read = _CountingReader(reader, stats)
    param_src, state_src = hf_layout.sources(cfg.model, fused_experts=fused)
    params = _place_tree(param_src, abstract["params"], read)
    model_state = _place_tree(state_src, abstract["model_state"], read)
    stats.seconds = time.perf_counter() - started
    return params, model_state, stats


def _place_tree(sources: dict, abstract: dict, read) -> dict:
    return {k: _place_tree(src, abstract[k], read) if isinstance(src, dict) else place(src, abstract[k], read)
            for k, src in sources.items()}


def _concrete(index: tuple, shape: tuple) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape)) + tuple(slice(0, n) for n in shape[len(index):])


def place(src, abstract: jax.ShapeDtypeStruct, read, budget: int | None = None) -> jax.Array:
    """One weight as a jax Array in abstract.sharding, built on this process's devices only. Devices that
    hold the same layers/experts share one read of them (`src.depth` leading axes are stacked sources);
    host blocks stay under `budget` bytes (default BLOCK_BYTES) or one HF tensor."""
    shape, sharding, k = abstract.shape, abstract.sharding, src.depth
    budget = BLOCK_BYTES if budget is None else budget
    indices = {d: _concrete(i, shape) for d, i in sharding.addressable_devices_indices_map(shape).items()}
    groups = collections.defaultdict(list)  # the stacked axes' ranges -> devices holding them
    for device, index in indices.items():
        groups[_key(index[:k])].append(device)
    shards = {}
    for devices in groups.values():
        lead = indices[devices[0]][:k]
        built = _fill(src, lead, [indices[d][k:] for d in devices], devices, shape[k:], abstract.dtype, read, budget)
        shards.update(zip(devices, built))
    return jax.make_array_from_single_device_arrays(shape, sharding, [shards[d] for d in indices])


def _key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop) for s in index)


def _fill(src, lead: tuple[slice, ...], trails: list, devices: list, unit: tuple, dtype, read, budget: int) -> list:
    """Each device's part of the stacked range `lead` (its own `trails` slice of the other axes): read once,
    in pieces along the stacked axes where the whole would pass `budget` bytes."""
    extents = [s.stop - s.start for s in lead]
    nbytes = math.prod(extents) * math.prod(unit) * 4  # float32 on the host
    split = next((a for a, n in enumerate(extents) if n > 1), None)
    if nbytes <= budget or split is None:
        host = src.block(read, lead)  # (*extents, *unit)
        every = (slice(None),) * len(lead)
        same = collections.defaultdict(list)  # distinct slice -> the devices holding it (replicas share a copy)
        for i, trail in enumerate(trails):
            same[_key(trail)].append(i)
        placed = [None] * len(devices)
        for positions in same.values():  # one host copy at a time, sent before the next is made
            part = np.ascontiguousarray(host[every + trails[positions[0]]], dtype=dtype)
            for i in positions:
                placed[i] = jax.device_put(part, devices[i])
            jax.block_until_ready([placed[i] for i in positions])
        return placed
    shape = [tuple(extents) + tuple(s.stop - s.start for s in trail) for trail in trails]
    buffers = [_zeros(s, dtype, d) for s, d in zip(shape, devices)]
    step = max(1, extents[split] * budget // nbytes)
    for start in range(0, extents[split], step):
        stop = min(start + step, extents[split])
        part_lead = lead[:split] + (slice(lead[split].start + start, lead[split].start + stop),) + lead[split + 1:]
        parts = _fill(src, part_lead, trails, devices, unit, dtype, read, budget)
        buffers = [_write(b, p, start, split) for b, p in zip(buffers, parts)]
    return buffers


def _zeros(shape: tuple, dtype, device) -> jax.Array:
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=jax.sharding.SingleDeviceSharding(device))()


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _write(buffer, part, start, axis: int):
    """buffer with `part` written at `start` along `axis` (in place: the buffer is donated)."""
    return jax.lax.dynamic_update_slice_in_dim(buffer, part, start, axis)


def initial_state(cfg: Config, hf_dir: str | Path, log: Callable[[str], None] = print,
                  reader: WeightReader | None = None):
    """(setup, state, stats): a new run's train state (step 0, a fresh optimizer state) holding HF_DIR's
    weights, built in its sharded layout without a random initialisation first (`reader`: HF_DIR's, if
    already open)."""
    from k2jax.train.step import abstract_train_state

    setup, abstract = abstract_train_state(cfg)
    reader = WeightReader(hf_dir) if reader is None else reader
    params, model_state, stats = import_weights(reader, cfg, abstract, hf_config(hf_dir), log)
    sh = setup.shardings
    state = {
        "step": jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=sh["step"])(),
        "params": params,
        "opt_state": jax.jit(setup.tx.init, out_shardings=sh["opt_state"])(params),
        "model_state": model_state,
        "rng": jax.jit(lambda: jax.random.key_data(jax.random.key(cfg.train.seed)), out_shardings=sh["rng"])(),
    }
    return setup, state, stats


def import_run(hf_dir: str | Path, run_dir: str | Path, overrides: Sequence[str] = (),
               log: Callable[[str], None] = print) -> ImportStats:
    """Write RUN_DIR (config.yaml, tokenizer/, checkpoints/0, import.json) from HF_DIR; `train --resume`,
    `sample`, `serve` and `eval` read it. Written to a sibling temporary directory, renamed when complete."""
    from k2jax.data import tokenizer as tokenizer_lib
    from k2jax.parallel import distributed

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if run_dir.exists():
        raise ConfigError(f"import: {run_dir} already exists; choose a new RUN_DIR (nothing was written)")
    cfg = run_config(hf_dir, None, [*overrides, f"train.out_dir={run_dir}"])
    try:
        tok = tokenizer_lib.from_hf_dir(hf_dir)
    except ValueError as e:
        raise InteropError(str(e)) from None
    if tok.vocab_size > cfg.model.vocab_size:
        raise InteropError(f"{hf_dir}: the tokenizer has {tok.vocab_size} ids, the model's vocab_size is "
                           f"{cfg.model.vocab_size}")
    reader = WeightReader(hf_dir)
    check_checkpoint(cfg.model, reader.shapes(), mtp_layers(hf_config(hf_dir)))  # refuse before writing anything
    partial = run_dir.with_name(f".{run_dir.name}.importing")
    if distributed.is_primary():
        shutil.rmtree(partial, ignore_errors=True)  # a killed import's leftovers
        partial.mkdir(parents=True)
    distributed.wait_for_all("k2jax_import_start")
    try:
        stats = _write_run(partial, run_dir, cfg, hf_dir, reader, tok, log)
    except BaseException:  # an error or Ctrl-C: no half-written run (a killed import's leftovers go next time)
        if distributed.is_primary():
            shutil.rmtree(partial, ignore_errors=True)
        raise
    distributed.wait_for_all("k2jax_import_done")
    return stats


def _write_run(partial: Path, run_dir: Path, cfg: Config, hf_dir: Path, reader: WeightReader, tok,
               log) -> ImportStats:
    """The imported run, written into `partial` and renamed to `run_dir` once complete."""
    import yaml

    from k2jax.parallel import distributed
    from k2jax.train.checkpoint import Checkpointer

    setup, state, stats = initial_state(cfg, hf_dir, log, reader)
    ckpt = Checkpointer(partial / "checkpoints", async_save=False)
    try:
        ckpt.save(0, state, {"imported_from": str(hf_dir.resolve())}, to_dict(cfg))
        ckpt.wait()
    finally:
        ckpt.close()
    reads = distributed.allgather_json({"tensors": stats.tensors, "stored_bytes": stats.stored_bytes})
    if distributed.is_primary():
        tok.save(partial / "tokenizer")
        (partial / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (partial / "import.json").write_text(json.dumps({
            "source": str(hf_dir.resolve()), "tensors": stats.tensors, "stored_bytes": stats.stored_bytes,
            "formats": dict(stats.formats), "skipped_mtp_tensors": len(stats.skipped), "seconds": stats.seconds,
            "mesh": dict(setup.mesh.shape), "read_by_process": reads}, indent=2))
        partial.rename(run_dir)
    return stats
