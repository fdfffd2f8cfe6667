"""`k2jax plan`: TPU compiles without a TPU (libtpu), and the per-device figures read off them."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from k2jax.config import ConfigError, load_config
from k2jax.parallel.topology import tpu_slice
from k2jax.platform import lowering_for
from k2jax.tools import hlo_stats
from k2jax.optim.owner import plan_owners
from k2jax.optim.owner_pool import LANE, pool_tables
from k2jax.parallel.sharding import make_mesh
from k2jax.tools.plan import plan
from k2jax.train.step import abstract_batch, abstract_train_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]
# the suite's persistent compilation cache stores deviceless TPU executables but cannot load them
# back (JAX then compiles again and warns)
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")


def test_hlo_stats_multiply_loops_out():
    """A scan of L all-gathers and matmuls compiled for a 4-chip v5p: FLOPs and collective bytes
    equal the closed forms (XLA's own cost analysis counts the loop body once)."""
    devices = tpu_slice("v5p:2x2x1").devices
    mesh = Mesh(np.asarray(devices), ("x",))
    layers, m, k = 6, 512, 256

    def body(x, w):  # x (m/4, k) per device: gather the rows, multiply, keep own rows
        full = jax.lax.all_gather(x, "x", tiled=True)  # (m, k)
        y = jnp.tanh(full @ w)
        return jax.lax.dynamic_slice_in_dim(y, jax.lax.axis_index("x") * (m // 4), m // 4), None

    def f(x, ws):
        return jax.lax.scan(body, x, ws)[0]

    sharded = jax.shard_map(f, mesh=mesh, in_specs=(P("x", None), P()), out_specs=P("x", None), check_vma=False)
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None))),
            jax.ShapeDtypeStruct((layers, k, k), jnp.bfloat16, sharding=NamedSharding(mesh, P())))
    compiled = jax.jit(sharded).lower(*args).compile()
    stats = hlo_stats.analyze(compiled.as_text())
    assert layers in stats.loops
    assert stats.flops == layers * 2 * m * k * k
    assert stats.collective_bytes == {"all-gather": layers * m * k * 2}
    assert stats.collective_calls == {"all-gather": layers}
    assert compiled.cost_analysis()["flops"] < stats.flops  # why the module exists


def test_hlo_stats_counts_only_window_taps_that_meet_the_input():
    """A padded 1-D convolution: 10 outputs x 3 taps, the two edge taps fall on padding, so 28
    taps x 4 input features x 3 output features x 2 FLOPs."""
    text = """
ENTRY %main (p0: f32[1,10,4], p1: f32[3,4,3]) -> f32[1,10,3] {
  %p0 = f32[1,10,4]{2,1,0} parameter(0)
  %p1 = f32[3,4,3]{2,1,0} parameter(1)
  ROOT %conv = f32[1,10,3]{2,1,0} convolution(%p0, %p1), window={size=3 pad=1_1}, dim_labels=b0f_0io->b0f
}
"""
    assert hlo_stats.analyze(text).flops == 2 * 28 * 4 * 3


def test_hlo_stats_counts_a_ragged_all_to_all_by_what_it_sends_or_receives():
    """A ragged all-to-all takes its output buffer as an operand too: the bytes are the larger of its
    input (64 x 8 bf16) and its output (80 x 8 bf16), not their sum, nor the offsets and sizes."""
    text = """
ENTRY %main (p0: bf16[64,8], p1: s32[4]) -> bf16[80,8] {
  %p0 = bf16[64,8]{1,0} parameter(0)
  %p1 = s32[4]{0} parameter(1)
  %zero = bf16[] constant(0)
  %buffer = bf16[80,8]{1,0} broadcast(%zero), dimensions={}
  ROOT %ragged = bf16[80,8]{1,0} ragged-all-to-all(%p0, %buffer, %p1, %p1, %p1, /*index=5*/%p1), replica_groups={{0,1,2,3}}
}
"""
    assert hlo_stats.analyze(text).collective_bytes == {"ragged-all-to-all": 80 * 8 * 2}


@pytest.fixture(scope="module")
def tiny_plan():
    cfg = load_config("experiments/tiny.yaml", ["mesh.data=1", "mesh.fsdp=4", "train.batch_size=8",
                                                "data.seq_len=128"])
    return cfg, plan(cfg, "v5p:2x2x1", parts=("step",))


def test_plan_reports_the_compiled_step(tiny_plan):
    """plan's figures for the tiny preset on 4 v5p chips equal what the compiled step says."""
    cfg, report = tiny_plan
    tpu = tpu_slice("v5p:2x2x1")
    setup, state = abstract_train_state(cfg, Mesh(np.asarray(tpu.devices).reshape(1, 4, 1, 1),
                                                  ("data", "fsdp", "expert", "tensor")))
    with lowering_for("tpu"):
        compiled = make_train_step(cfg, setup).trace(state, abstract_batch(cfg, setup.mesh)).lower().compile()
    step = report["parts"]["step"]
    m = compiled.memory_analysis()
    assert step["memory"]["temporaries"] == m.temp_size_in_bytes
    assert step["memory"]["arguments"] == m.argument_size_in_bytes
    assert step["hbm_bytes"] == (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                                 + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    assert step["fits"] and step["hbm_bytes"] < report["hbm_per_device"] == 95 * 2 ** 30
    stats = hlo_stats.analyze(compiled.as_text())
    assert step["flops"] == stats.flops and step["collective_bytes"] == stats.collective_bytes
    assert step["kernel_calls"] > 0  # TPU flash attention and ragged dots are Mosaic kernels
    assert set(step["collective_bytes"]) >= {"all-gather", "reduce-scatter"}  # FSDP: weights in, grads out
    assert report["devices"] == 4 and report["mesh"]["fsdp"] == 4
    params = jax.tree.leaves(state["params"])  # what one device holds of them: the fsdp shard of each
    assert report["param_bytes_per_device"] == sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in params)
    bounds = report["bounds"]
    assert bounds["step_seconds"] >= bounds["compute_seconds"] > 0 and 0 < bounds["mfu_at_bound"] <= 1


def test_plan_command_prints_its_report_first_and_writes_json(tmp_path):
    """`k2jax plan` as a person runs it (the installed command, JAX_PLATFORMS unset, a compilation cache set):
    its own report is the first line of stdout and stderr together, without libtpu's start-up lines (host
    bounds, InitGoogle, worker hostnames, a source-location trace) or the cache's failed reads."""
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    proc = subprocess.run([str(Path(sys.executable).parent / "k2jax"), "plan", "experiments/tiny.yaml", "--topology",
                           "v5p:2x2x1", "--parts", "update", "--set", "mesh.data=4", "--set", "train.batch_size=4",
                           "--set", "data.seq_len=128", "--json", str(out), "--hlo", str(tmp_path / "hlo")],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert proc.stdout.startswith("0.129M parameters (0.111M activated) with muonclip on v5p:2x2x1: 4 devices"), \
        proc.stdout[:2000]
    assert "update  yes" in proc.stdout and "Newton-Schulz" in proc.stdout, proc.stdout
    # data parallel: each replica orthogonalises its share of the matrices and all-gathers the rest
    assert out.exists() and "all-gather" in (tmp_path / "hlo" / "update.hlo.txt").read_text()
    # the update alone: Newton-Schulz is plain XLA, so its FLOPs are all counted; each of the 4
    # devices runs at least its share of one copy, and the busiest one at most the whole
    report = json.loads(out.read_text())
    update, one_copy = report["parts"]["update"], report["newton_schulz_flops_one_copy"]
    assert one_copy / 4 <= report["newton_schulz_flops_busiest_device"] <= update["flops"] <= one_copy
    ratio = sum(update["collective_bytes"].values()) / report["param_bytes_per_device"]
    assert "update collectives per device / its parameter bytes" in proc.stdout and f"{ratio:.1f}x" in proc.stdout


@pytest.mark.parametrize("sets", [["mesh.data=1", "mesh.fsdp=8"], ["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"]],
                         ids=str)
def test_owner_muon_pools_short_stacks_into_ragged_exchanges_on_tpu(sets):
    """tiny's update on 8 v5p chips: the stacks that would pad their group (the one-layer dense stack;
    with data 2, everything replicated over data) are pooled, and on TPU a pool moves exactly its two
    ragged all-to-all buffers (pieces in 128-element rows, not XLA's 128x-padded 1-D layout) and its
    bucket all-gather. The whole update moves at most 2.5x the parameter bytes a device holds."""
    cfg = load_config("experiments/tiny.yaml", sets + ["train.batch_size=8", "data.seq_len=128"])
    report = plan(cfg, "v5p:2x2x2", parts=("update",))
    mesh = make_mesh(cfg.mesh, tpu_slice("v5p:2x2x2").devices)
    setup, state = abstract_train_state(cfg, mesh)
    _, pools, _ = plan_owners(setup.infos, jax.tree.leaves(state["params"]), mesh, cfg.optim.ns_steps)
    assert pools
    ragged = gathered = 0
    for pool in pools:
        t = pool_tables(pool, mesh)
        senders = math.prod(mesh.shape[a] for a in pool.senders)
        ragged += 2 * max(int(t.bucket_size.max()), senders * t.capacity) * LANE * 4  # there and back
        if pool.replicas:
            gathered += math.prod(mesh.shape[a] for a in pool.replicas) * int(t.bucket_size.max()) * LANE * 4
    moved = report["parts"]["update"]["collective_bytes"]
    assert moved["ragged-all-to-all"] == ragged
    assert moved.get("all-gather", 0) >= gathered
    assert sum(moved.values()) <= 2.5 * report["param_bytes_per_device"], (moved, report["param_bytes_per_device"])


# what libtpu 0.0.42.1 wrote to stderr at its start on a machine without a TPU (the E0000 line shortened)
START_UP_NOISE = """\
Failed to find host bounds for accelerator type: WARNING: could not determine TPU accelerator type, please set env \
var `TPU_ACCELERATOR_TYPE` manually, otherwise libtpu.so may not properly initialize.
WARNING: Logging before InitGoogle() is written to STDERR
E0000 00:00:1796330427.316561   21684 common_lib.cc:554] INVALID_ARGUMENT: Error: unexpected worker hostname \
'WARNING: could not determine TPU worker hostnames or IP addresses' from env var TPU_WORKER_HOSTNAMES.
=== Source Location Trace: ===
learning/45eac/tfrc/runtime/libtpu_init_utils.cc:327
"""


def test_libtpu_start_up_noise_is_held_back_and_anything_else_shown(capfd):
    from k2jax.tools.plan import libtpu_start_up_quiet

    with libtpu_start_up_quiet():
        os.write(2, (START_UP_NOISE + "E0000 00:00:1.0 1 tpu.cc:1] something else went wrong\n").encode())
    assert capfd.readouterr().err == "E0000 00:00:1.0 1 tpu.cc:1] something else went wrong\n"
    with pytest.raises(RuntimeError, match="the start-up failed"):
        with libtpu_start_up_quiet():
            os.write(2, (START_UP_NOISE + "why it failed\n").encode())
            raise RuntimeError("the start-up failed")
    assert capfd.readouterr().err == "why it failed\n"


@pytest.mark.parametrize("topology, message", [
    ("v9x:2x2", "unknown TPU generation 'v9x'"),
    ("v5p-8", "not GENERATION:AxB"),
    ("v5p:3x3x3", "the TPU runtime refused it"),
])
def test_bad_topology_is_a_clear_error(topology, message):
    with pytest.raises(ConfigError, match=message):
        tpu_slice(topology)


def test_mesh_that_does_not_match_the_slice_is_an_error():
    cfg = load_config("experiments/tiny.yaml", ["mesh.data=1", "mesh.fsdp=8"])
    with pytest.raises(ConfigError, match="need 8 devices, have 4"):
        plan(cfg, "v5p:2x2x1")


def test_missing_libtpu_says_how_to_install(tmp_path):
    fake = tmp_path / "libtpu"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    # (without the TPU_* variables libtpu's loading left in this process, which name its path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")} | {"PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", "from k2jax.parallel.topology import tpu_slice; "
                           "tpu_slice('v5p:2x2x1')"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "pip install libtpu" in proc.stderr, proc.stderr[-2000:]


def test_cli_on_a_machine_without_tpu_runs_quietly_on_the_cpu(tmp_path):
    """libtpu is installed, but with no TPU chip the CLI keeps JAX off the TPU runtime (which
    would print errors about missing TPU hosts before falling back to the CPU)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    code = ("import sys; from k2jax.platform import skip_absent_tpu; skip_absent_tpu(); import jax; "
            "print(jax.default_backend())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "cpu" and "TPU" not in proc.stderr, proc.stderr[-2000:]


def test_plan_decode_compiles_a_chunk_over_a_sharded_cache():
    """`--parts decode`: one engine decode chunk for tiny on 4 v5p chips; the slots round up to the
    batch shards, each device holds its share of the cache, and the donated cache is aliased."""
    from k2jax.inference.cache import bytes_per_token
    from k2jax.tools.plan import TRAIN_PARTS, format_report

    cfg = load_config("experiments/tiny.yaml", ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2"])
    report = plan(cfg, "v5p:2x2x1", parts=("decode",), decode_batch=3, decode_len=256, decode_steps=2)
    decode, part = report["decode"], report["parts"]["decode"]
    assert decode["slots"] == 4 and decode["batch_shards"] == 4  # batch axes: data x fsdp x expert
    cache = bytes_per_token(cfg.model) * 4 * 256 / 4
    assert decode["cache_bytes_per_device"] == cache
    assert part["fits"] and part["error"] is None and 0 < part["hbm_bytes"] < report["hbm_per_device"]
    assert part["memory"]["aliased"] >= cache  # the cache is donated: updated in place
    assert part["memory"]["arguments"] >= cache + decode["param_bytes_per_device"]
    assert "decode: 2 step(s) over 4 slots (3 rounded up" in format_report(report)
    assert "decode" not in TRAIN_PARTS and plan.__defaults__[0] == TRAIN_PARTS  # not compiled unless asked


def _newton_schulz_line(capsys, *args) -> tuple[float, str]:
    from k2jax.cli import main

    capsys.readouterr()
    assert main(["info", *args]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("Newton-Schulz FLOPs per Muon step"))
    return float(line.split(" = ")[1].split("%")[0]), line


def test_info_measures_newton_schulz_against_the_batch_of_the_config_given(capsys):
    """`k2jax info --config kimi-k2` compares one Newton-Schulz pass with a step of K2's own batch (about 67M
    tokens, 4096-token rows: well under 1%), not with the default experiment's 2,048 tokens (124x the step);
    --set changes the batch, and a YAML's batch is its own; the line says which batch."""
    share, line = _newton_schulz_line(capsys, "--config", "kimi-k2")
    assert "of a step of 16,384 x 4,096 = 67,108,864 tokens (train.batch_size x data.seq_len, kimi-k2's " \
           "published training batch; change with --set)" in line, line
    assert 0.1 < share < 1, line
    smaller, line = _newton_schulz_line(capsys, "--config", "kimi-k2", "--set", "train.batch_size=512")
    assert "of a step of 512 x 4,096 = 2,097,152 tokens (train.batch_size x data.seq_len, as --set)" in line, line
    assert smaller == pytest.approx(32 * share, rel=0.03)  # Newton-Schulz does not grow with the batch (2 decimals)
    _, line = _newton_schulz_line(capsys, "--config", "experiments/tiny.yaml")
    assert "8 x 64 = 512 tokens (train.batch_size x data.seq_len, from experiments/tiny.yaml" in line, line
