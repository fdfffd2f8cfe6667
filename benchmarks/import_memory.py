"""Host memory of `k2jax import` (streamed, sharded) against loading the whole checkpoint, in one run.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/import_memory.py      # ~2 min on 2 cores

Writes a randomly initialised `medium` model (142M parameters) as a Kimi-K2-style checkpoint (FP8
projections with 128x128 block scales, the rest bf16, 64 MB files and an index), then, each in a fresh
process with 8 fake CPU devices (mesh fsdp 2 x expert 4):
- streamed: interop.importer.import_weights into the run's sharding;
- whole: interop.deepseek_v3.load_hf_checkpoint (every tensor as float32 numpy, then placed).
A thread samples the process's resident memory every millisecond. On CPU devices the placed weights
live in host memory too, so the transient host memory is the peak of (resident - baseline - bytes of
every device's shards of the live jax Arrays); baseline is taken after JAX and the abstract state exist. Prints a
Markdown table against the checkpoint's float32 bytes and its largest tensor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).parents[1]
os.environ.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")  # every step's process
MESH = ["mesh.fsdp=2", "mesh.expert=4"]

MEASURE = textwrap.dedent("""
    import json, os, sys, threading, time
    import jax, numpy as np
    from k2jax.interop import importer
    from k2jax.interop.deepseek_v3 import load_hf_checkpoint
    from k2jax.interop.quant import WeightReader
    from k2jax.generate import _with_weights
    from k2jax.train.step import abstract_train_state

    mode, hf_dir, mesh = sys.argv[1], sys.argv[2], sys.argv[3:]
    page = os.sysconf("SC_PAGE_SIZE")

    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    cfg = importer.run_config(hf_dir, None, mesh)
    setup, abstract = abstract_train_state(cfg)
    peak = [0]
    done = threading.Event()
    baseline = resident()

    def on_devices():  # every device's copy: a weight replicated 4 times takes 4 x its bytes
        return sum(sh.data.nbytes for x in jax.live_arrays() for sh in x.addressable_shards)

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident() - baseline - on_devices())
            time.sleep(0.001)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    started = time.perf_counter()
    on_devices()
    if mode == "streamed":
        params, biases, _ = importer.import_weights(WeightReader(hf_dir), cfg, abstract, importer.hf_config(hf_dir),
                                                    log=lambda _: None)
    else:
        _, p, b = load_hf_checkpoint(hf_dir)
        params = jax.device_put(p, setup.shardings["params"])
        biases = jax.device_put(b, setup.shardings["model_state"])
        del p, b
    jax.block_until_ready((params, biases))
    seconds = time.perf_counter() - started
    time.sleep(0.01)
    done.set()
    watcher.join()
    print(json.dumps({"transient": peak[0], "placed": on_devices(), "seconds": seconds}))
""")


def write_checkpoint(directory: Path, vocab: int) -> dict:
    """The medium model with `vocab` entries, randomly initialised, as an FP8 checkpoint; its tensor bytes
    (float32) and the largest."""
    code = textwrap.dedent(f"""
        import json, jax, numpy as np
        from k2jax.config import load_config
        from k2jax.data.tokenizer import ByteTokenizer
        from k2jax.interop.deepseek_v3 import save_hf_checkpoint, to_hf_state_dict
        from k2jax.train.step import init_train_state
        cfg = load_config(None, ["model.preset=medium", "model.vocab_size={vocab}"])
        _, state = init_train_state(cfg)
        params, biases = jax.device_get(state["params"]), jax.device_get(state["model_state"])
        save_hf_checkpoint({str(directory)!r}, params, biases, cfg.model, dtype="fp8", shard_bytes=64 << 20)
        ByteTokenizer().save({str(directory / "tokenizer")!r})
        sizes = [v.size * 4 for v in to_hf_state_dict(params, biases, cfg.model).values()]
        print(json.dumps({{"total": sum(sizes), "largest": max(sizes), "tensors": len(sizes)}}))
    """)
    return json.loads(_run(code).splitlines()[-1])


def _run(code: str, *args: str) -> str:
    return _python("-c", code, *args)


def _python(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"benchmark step {' '.join(args)[:200]} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def use_imported(hf_dir: Path, tmp: Path) -> None:
    """`k2jax import` onto the 8 devices, then the imported run trains two steps, samples and serves a request."""
    from rephrase_throughput import start_server  # benchmarks/: `k2jax serve` as a subprocess, once it answers

    run = tmp / "imported"
    cli = ["-m", "k2jax.cli"]
    small = ["--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "data.seq_len=64", "--set",
             "data.max_corpus_bytes=400000", "--set", "train.progress=false", "--set", "eval.tasks=[]",
             "--set", "eval.bits_per_byte=[]"]
    steps = [("import", [*cli, "import", str(hf_dir), str(run), *(a for m in MESH for a in ("--set", m))]),
             ("train", [*cli, "train", str(run / "config.yaml"), "--resume", *small]),
             ("sample", [*cli, "sample", str(run), "--tokens", "8", "--temperature", "0"])]
    for name, args in steps:
        print(f"{name}: {_python(*args).strip().splitlines()[-1][:160]}")
    proc, url = start_server(run, tmp / "serve.log", max_len=64)
    try:
        reply = httpx.post(f"{url}/v1/completions", json={"model": "imported", "prompt": "def ", "max_tokens": 8,
                                                           "temperature": 0}, timeout=300).json()
        print(f"serve: /v1/completions -> {reply['usage']['completion_tokens']} tokens, "
              f"finish_reason {reply['choices'][0]['finish_reason']!r}")
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    mib = 2 ** 20
    print(f"`medium` (vocab 32768 and 98304) as FP8 checkpoints; 8 CPU devices, {' '.join(MESH)}\n")
    print("| vocab | tensors (float32 MiB) | stored MiB | largest tensor MiB | load | transient host MiB | "
          "/ largest | / all | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    streamed = []
    for vocab in (98304, 32768):
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = Path(tmp) / "medium-fp8"
            sizes = write_checkpoint(hf_dir, vocab)
            stored = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
            for mode in ("streamed", "whole"):
                r = json.loads(_run(MEASURE, mode, str(hf_dir), *MESH).splitlines()[-1])
                print(f"| {vocab} | {sizes['total'] / mib:,.0f} | {stored / mib:,.0f} | {sizes['largest'] / mib:,.0f} | "
                      f"{mode} | {r['transient'] / mib:,.0f} | {r['transient'] / sizes['largest']:.2f}x | "
                      f"{r['transient'] / sizes['total']:.2f}x | {r['seconds']:.1f} |")
                if mode == "streamed":
                    streamed.append((sizes["largest"], r["transient"]))
            if vocab == 32768:
                print()
                use_imported(hf_dir, Path(tmp))
    (x0, y0), (x1, y1) = streamed
    slope = (y1 - y0) / (x1 - x0)
    print(f"\nstreamed: transient = {slope:.2f} x largest tensor + {(y0 - slope * x0) / mib:,.0f} MiB "
          f"(the line through both sizes)")


if __name__ == "__main__":
    main()
