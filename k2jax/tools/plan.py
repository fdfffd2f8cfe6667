"""Fit and cost of a training job on a TPU slice, from a CPU: `k2jax plan CONFIG --topology v5p:8x8x8`.

The train step is compiled by XLA's TPU compiler for the slice's devices (libtpu, no TPU):
whole, and as its two halves (forward+backward with gradient accumulation; the optimizer
update), so a failure says which half fails and by how much. Per device it reports what
the compiler reserves in HBM, the matmul FLOPs and collective bytes of the optimized
program with loops multiplied out (`hlo_stats`; XLA's own cost analysis counts loop bodies
once), the model's FLOPs and one copy of Muon's Newton-Schulz FLOPs for comparison, and a
lower bound on the step time from the chip's peak FLOP/s and interconnect bandwidth.

Part "decode" (`--parts decode`, not a default) compiles one chunk of the generation engine's
decode (`k2jax.inference.engine.decode_chunk_program`) instead: the model's parameters as training
shards them, a cache of `decode_batch` slots x `decode_len` positions split over the batch
axes as the engine splits it, attending over the whole cache; it says whether such a batch
of long contexts fits, and the cache's bytes per device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config import Config
from k2jax.model.flops import analytic_param_counts, flops_per_token
from k2jax.optim.muon import newton_schulz_flops
from k2jax.optim.owner import owner_newton_schulz_flops
from k2jax.parallel.sharding import make_mesh, replicated
from k2jax.parallel.topology import Slice, tpu_slice
from k2jax.platform import lowering_for
from k2jax.tools import hlo_stats
from k2jax.train.step import abstract_batch, abstract_train_state, make_grad_step, make_train_step, make_update_step

TRAIN_PARTS = ("step", "grads", "update")
PARTS = TRAIN_PARTS + ("decode",)


@dataclasses.dataclass
class PartReport:
    """One compiled program (or the compiler's refusal) on one device of the slice."""

    name: str
    fits: bool
    compile_seconds: float
    hbm_bytes: float | None = None  # arguments + outputs - aliased + temporaries + code
    memory: dict[str, int] = dataclasses.field(default_factory=dict)
    error: str | None = None  # the compiler's words when it refused
    flops: float | None = None  # matmul FLOPs per device, loops multiplied out
    compiler_flops: float | None = None  # XLA's cost_analysis (loop bodies counted once)
    compiler_seconds: float | None = None  # XLA's optimal_seconds
    kernel_calls: int | None = None
    collective_bytes: dict[str, float] = dataclasses.field(default_factory=dict)
    loops: list[int] = dataclasses.field(default_factory=list)


# What libtpu writes to stderr when it starts on a machine that is no TPU VM (a deviceless compile needs no
# TPU host, worker or accelerator type): its C++ logging before InitGoogle, which no log-level variable
# (TPU_STDERR_LOG_LEVEL, TPU_MIN_LOG_LEVEL, TF_CPP_MIN_LOG_LEVEL) reaches, and a source-location trace.
_START_UP_NOISE = re.compile(r"Failed to find host bounds for accelerator type|WARNING: Logging before InitGoogle\(\)|"
                             r"unexpected worker hostname|could not determine TPU|=== Source Location Trace")
_TRACE_LINE = re.compile(r"\S+\.(cc|h|cpp):\d+\s*$")  # a frame of such a trace: path/file.cc:327


@contextlib.contextmanager
def libtpu_start_up_quiet():
    """Run the block (libtpu's start-up, in `tpu_slice`) with file descriptor 2 held in a temporary file, then
    write out what it held but the start-up noise above: a warning or error of any other kind still shows, and
    a failure raises as it would (its message is the exception's)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = _without_start_up_noise(held.read().decode(errors="replace"))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def _without_start_up_noise(text: str) -> str:
    kept, in_trace = [], False
    for line in text.splitlines(keepends=True):
        if _START_UP_NOISE.search(line):
            in_trace = "Source Location Trace" in line
            continue
        if in_trace and _TRACE_LINE.match(line):
            continue
        in_trace = False
        kept.append(line)
    return "".join(kept)


def _compile(name: str, jitted, args, hbm: int, hlo_dir: Path | None = None, kwargs=None) -> PartReport:
    started = time.perf_counter()
    try:
        with lowering_for("tpu"):
            compiled = jitted.trace(*args, **(kwargs or {})).lower().compile()
    except Exception as error:  # noqa: BLE001  (XlaRuntimeError: the compiler's refusal is the result)
        text = str(error)
        need = _compiler_bytes(r"Used ([0-9.]+)([KMGT]) of [0-9.]+[KMGT] hbm", text) or _compiler_bytes(
            r"required for HLO temporaries \(([0-9.]+)([KMGT])\)", text)
        return PartReport(name, False, time.perf_counter() - started, hbm_bytes=need,
                          error="\n".join(text.strip().splitlines()[:6]))
    seconds = time.perf_counter() - started
    m = compiled.memory_analysis()
    memory = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
              "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
              "code": m.generated_code_size_in_bytes}
    need = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"] + memory["code"]
    cost = compiled.cost_analysis() or {}
    text = compiled.as_text()
    if hlo_dir is not None:
        hlo_dir.mkdir(parents=True, exist_ok=True)
        (hlo_dir / f"{name}.hlo.txt").write_text(text)
    stats = hlo_stats.analyze(text)
    return PartReport(name, need <= hbm, seconds, need, memory, None, stats.flops, cost.get("flops"),
                      cost.get("optimal_seconds"), stats.kernel_calls, stats.collective_bytes, stats.loops)


def _compiler_bytes(pattern: str, text: str) -> float | None:
    """A size the compiler wrote as e.g. 115.60G (binary units), found by `pattern`."""
    found = re.search(pattern, text)
    return float(found.group(1)) * 1024 ** ("KMGT".index(found.group(2)) + 1) if found else None


def state_bytes_per_device(state) -> tuple[float, float]:
    """(bytes one device holds of the abstract train state, bytes if every leaf split evenly)."""
    held = total = 0.0
    for leaf in jax.tree.leaves(state):
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
        shard = leaf.sharding.shard_shape(leaf.shape)
        held += math.prod(shard) * leaf.dtype.itemsize
        total += nbytes
    return held, total / leaf.sharding.mesh.size


def plan(cfg: Config, topology: str, parts=TRAIN_PARTS, hlo_dir: str | None = None, *,
         decode_batch: int = 32, decode_len: int = 32768, decode_steps: int = 1) -> dict:
    """Compile cfg's train step (and/or its halves, and/or a decode chunk) for `topology`; a dict of
    what was found. hlo_dir: also write each part's optimized HLO there (PART.hlo.txt).
    decode_*: the decode part's cache slots (rounded up to the mesh's batch shards, as the engine
    does), positions per slot (the span attended) and decode steps in the compiled chunk."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    with libtpu_start_up_quiet():
        tpu: Slice = tpu_slice(topology)
    mesh = make_mesh(cfg.mesh, tpu.devices)
    setup, state = abstract_train_state(cfg, mesh)
    batch = abstract_batch(cfg, mesh)
    devices = len(tpu.devices)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    held, even = state_bytes_per_device(state)
    report = {
        "config": {"parameters": analytic_param_counts(cfg.model), "optimizer": cfg.optim.name,
                   "muon_sharding": cfg.optim.muon_sharding, "batch_size": cfg.train.batch_size,
                   "seq_len": cfg.data.seq_len, "grad_accum": cfg.train.grad_accum},
        "topology": topology, "devices": devices, "chips": tpu.chips, "mesh": dict(mesh.shape),
        "hbm_per_device": tpu.hbm_per_device,
        "peak_flops_per_device": tpu.chip.peak_bf16 / tpu.devices_per_chip,
        "ici_bytes_per_s_per_device": tpu.chip.ici_bandwidth / tpu.devices_per_chip,
        "state_bytes_per_device": held, "state_bytes_if_even": even,
        "param_bytes_per_device": state_bytes_per_device({"params": state["params"]})[0],
        "model_flops_per_device": flops_per_token(cfg.model, cfg.data.seq_len)["total"] * tokens / devices,
        "newton_schulz_flops_one_copy": newton_schulz_flops(setup.infos, state["params"], cfg.optim.ns_steps,
                                                            use_muon=cfg.optim.name != "adamw"),
        "newton_schulz_flops_busiest_device": None,
        "parts": {},
    }
    if (cfg.optim.name != "adamw" and cfg.optim.muon_sharding == "owner" and devices > 1
            and set(parts) & set(TRAIN_PARTS)):
        report["newton_schulz_flops_busiest_device"] = owner_newton_schulz_flops(
            setup.infos, state["params"], mesh, cfg.optim.ns_steps)
    programs = {
        "step": lambda: (make_train_step(cfg, setup), (state, batch)),
        "grads": lambda: (make_grad_step(cfg, setup), (state["params"], state["model_state"], batch)),
        "update": lambda: (make_update_step(setup), (state, *_abstract_grads(cfg, setup, state, batch))),
    }
    if "decode" in parts:
        report["decode"] = _decode_setup(cfg, mesh, state, decode_batch, decode_len, decode_steps)
    for name in parts:
        kwargs = None
        if name == "decode":
            jitted, args, kwargs = _decode_program(cfg, mesh, state, report["decode"])
        else:
            jitted, args = programs[name]()
        report["parts"][name] = dataclasses.asdict(_compile(name, jitted, args, tpu.hbm_per_device,
                                                            Path(hlo_dir) if hlo_dir else None, kwargs))
    report["bounds"] = _time_bounds(report)
    return report


def _decode_setup(cfg: Config, mesh, state: dict, batch: int, length: int, steps: int) -> dict:
    """The decode part's sizes: slots rounded up to the batch shards, the cache's bytes per device."""
    from k2jax.inference import cache as cache_lib
    from k2jax.inference.engine import batch_shards

    if batch < 1 or steps < 1 or not 2 <= length <= cfg.model.max_seq_len:
        raise ValueError(f"decode batch ({batch}) and steps ({steps}) must be positive and decode length "
                         f"({length}) in [2, model.max_seq_len={cfg.model.max_seq_len}]")
    shards = batch_shards(mesh)
    slots = -(-batch // shards) * shards  # the engine splits its slots evenly over the batch axes
    params_held, _ = state_bytes_per_device({"params": state["params"], "model_state": state["model_state"]})
    per_token = cache_lib.bytes_per_token(cfg.model)
    return {"batch": batch, "slots": slots, "len": length, "steps": steps, "batch_shards": shards,
            "cache_bytes_per_token": per_token, "cache_bytes_per_device": per_token * slots * length / shards,
            "param_bytes_per_device": params_held, "param_dtype": cfg.model.param_dtype}


def _decode_program(cfg: Config, mesh, state: dict, sizes: dict):
    """The engine's compiled decode chunk and its abstract arguments: the model's variables as the
    train state shards them, the cache split over the batch axes, the per-slot host arrays replicated."""
    from k2jax.inference import cache as cache_lib
    from k2jax.inference.engine import cache_sharding, decode_chunk_program
    from k2jax.inference.sampling import RowSettings
    from k2jax.model.transformer import Transformer

    model = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0), cfg.execution))
    nnx.update(model, state["params"])
    nnx.update(model, state["model_state"])
    graphdef, variables = nnx.split(model)
    slots, length = sizes["slots"], sizes["len"]
    sharding = cache_sharding(mesh, cfg.model)
    cache = jax.eval_shape(lambda: cache_lib.new_cache(cfg.model, slots, length))
    cache = jax.tree.map(lambda c: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=sharding), cache)
    row = lambda dtype: jax.ShapeDtypeStruct((slots,), dtype, sharding=replicated(mesh))  # noqa: E731
    settings = RowSettings(row(jnp.float32), row(jnp.int32), row(jnp.float32), row(jnp.uint32))
    args = (graphdef, variables, cache, row(jnp.int32), row(jnp.int32), row(jnp.int32), row(jnp.bool_),
            row(jnp.int32), row(jnp.int32), settings)
    kwargs = {"steps": sizes["steps"], "span": length, "vocab_size": cfg.model.vocab_size, "mesh": mesh}
    return decode_chunk_program, args, kwargs


def _abstract_grads(cfg, setup, state, batch):
    """The update step's other inputs (gradients, max logits) as the grads half outputs them."""
    grads, _, stats = jax.eval_shape(make_grad_step(cfg, setup), state["params"], state["model_state"], batch)
    grads = jax.tree.map(lambda g, p: jax.ShapeDtypeStruct(g.shape, g.dtype, sharding=p.sharding),
                         grads, state["params"])
    return grads, stats.max_logits


def _time_bounds(report: dict) -> dict:
    """Lower bounds on the whole step's time per device: matmuls at peak, collectives at the
    interconnect's bandwidth, the larger of the two (perfect overlap), and the MFU it implies."""
    step = report["parts"].get("step")
    if not step or step["flops"] is None:
        return {}
    # kernels' FLOPs are not in the HLO count, so the model's own FLOPs plus this device's share
    # of Newton-Schulz (the busiest device's, or an even share) bound the work from below too
    newton_schulz = report["newton_schulz_flops_busiest_device"] or (
        report["newton_schulz_flops_one_copy"] / report["devices"])
    compute = max(step["flops"], report["model_flops_per_device"] + newton_schulz) / report["peak_flops_per_device"]
    comm = sum(step["collective_bytes"].values()) / report["ici_bytes_per_s_per_device"]
    bound = max(compute, comm)
    return {"compute_seconds": compute, "collective_seconds": comm, "step_seconds": bound,
            "mfu_at_bound": report["model_flops_per_device"] / (bound * report["peak_flops_per_device"]),
            "compiler_seconds": step["compiler_seconds"]}


def format_report(report: dict) -> str:
    """The report as a person reads it."""
    c = report["config"]
    hbm = report["hbm_per_device"]
    lines = [
        f"{_billions(c['parameters']['total'])} parameters ({_billions(c['parameters']['activated'])} activated) "
        f"with {c['optimizer']} on {report['topology']}: {report['devices']} devices "
        f"({report['chips']} chips), mesh {report['mesh']}, batch {c['batch_size']} x {c['seq_len']} tokens "
        f"in {c['grad_accum']} micro-batches",
        f"HBM per device {_bytes(hbm)}; train state per device {_bytes(report['state_bytes_per_device'])} "
        f"(if every array split evenly: {_bytes(report['state_bytes_if_even'])})",
        *([_decode_line(report["decode"])] if "decode" in report else []),
        f"model FLOPs per device {report['model_flops_per_device']:.3g}; Newton-Schulz FLOPs of one copy of "
        f"the update {report['newton_schulz_flops_one_copy']:.3g} (ideal per device: "
        f"{report['newton_schulz_flops_one_copy'] / report['devices']:.3g})",
        "",
        f"{'part':7s} {'fits':4s} {'HBM needed':>12s} {'temporaries':>12s} {'matmul FLOPs':>13s} "
        f"{'kernels':>7s} {'collectives':>12s}  compile",
    ]
    for name, p in report["parts"].items():
        need = _bytes(p["hbm_bytes"]) if p["hbm_bytes"] is not None else "?"
        if p["error"]:
            lines.append(f"{name:7s} {'NO':4s} {need:>12s}  the compiler: {p['error'].splitlines()[0][:160]}")
            continue
        lines.append(f"{name:7s} {'yes' if p['fits'] else 'NO':4s} {need:>12s} {_bytes(p['memory']['temporaries']):>12s} "
                     f"{p['flops']:13.3g} {p['kernel_calls']:7d} {_bytes(sum(p['collective_bytes'].values())):>12s}  "
                     f"{p['compile_seconds']:.0f} s")
    for name, p in report["parts"].items():
        if p["collective_bytes"]:
            kinds = ", ".join(f"{k} {_bytes(v)}" for k, v in sorted(p["collective_bytes"].items()))
            lines.append(f"  {name} collectives per device: {kinds}")
    one_copy, busiest = report["newton_schulz_flops_one_copy"], report["newton_schulz_flops_busiest_device"]
    update = report["parts"].get("update")
    if update and update["flops"] and one_copy:
        lines.append(f"  update matmul FLOPs per device / one copy of Newton-Schulz: {update['flops'] / one_copy:.1%} "
                     f"(ideal {1 / report['devices']:.1%})" + (" (counts padding slots that devices skip)" if busiest else ""))
    if update and update["collective_bytes"]:
        moved = sum(update["collective_bytes"].values())
        lines.append(f"  update collectives per device / its parameter bytes ({_bytes(report['param_bytes_per_device'])}):"
                     f" {moved / report['param_bytes_per_device']:.1f}x")
    if busiest:
        lines.append(f"  owner-sharded Muon: the busiest device runs {busiest:.3g} Newton-Schulz FLOPs = "
                     f"{busiest / one_copy:.1%} of one copy, {busiest * report['devices'] / one_copy:.2f}x its even share")
    b = report.get("bounds")
    if b:
        xla = b["compiler_seconds"]
        lines.append(f"step time >= {b['step_seconds'] * 1e3:,.1f} ms (matmuls at peak {b['compute_seconds'] * 1e3:,.1f} ms, "
                     f"collectives at ICI bandwidth {b['collective_seconds'] * 1e3:,.1f} ms); so MFU at most "
                     f"{b['mfu_at_bound']:.1%}; XLA's own estimate "
                     + (f"{xla * 1e3:,.1f} ms" if xla and xla > 0 else f"unusable ({xla})"))
    return "\n".join(lines)


def _decode_line(d: dict) -> str:
    slots = f"{d['slots']} slots" + (f" ({d['batch']} rounded up to the {d['batch_shards']} batch shards)"
                                     if d["slots"] != d["batch"] else "")
    return (f"decode: {d['steps']} step(s) over {slots} x {d['len']} positions; cache per device "
            f"{_bytes(d['cache_bytes_per_device'])} ({d['cache_bytes_per_token']:,} bytes per token), "
            f"{d['param_dtype']} weights per device {_bytes(d['param_bytes_per_device'])}")


def _billions(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e8 else f"{n / 1e6:.3g}M"


def _bytes(n: float) -> str:
    for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:.0f} B"
