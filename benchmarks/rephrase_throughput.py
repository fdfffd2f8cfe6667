"""`k2jax rephrase` throughput against `k2jax serve`: concurrency 1 against 16, in one run.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/rephrase_throughput.py      # ~1 min on 2 cores

Writes a randomly initialised `tiny` run directory (speed does not depend on the weights), starts
`k2jax serve` on it as a subprocess (--max-batch 16) and rephrases the same short documents at
each concurrency into a fresh directory, after untimed passes at concurrency 1, 2, 4, 8 and 16
that compile the prefill of every batch size (the prompts share one length bucket). Each document is one chunk and one request: a random model seldom stops before
--max-tokens, so with --retries 0 a cut-off rewrite is dropped, not retried, and every arm does
the same work. Prints a Markdown table of generated tokens/s, documents/s and the server's mean
decode batch (/stats), and the ratios to concurrency 1.
"""

from __future__ import annotations

import argparse
import queue
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx
import yaml

from k2jax.config import load_config, to_dict
from k2jax.data import tokenizer as tokenizer_lib
from k2jax.rephrase.client import Client
from k2jax.rephrase.job import Job
from k2jax.rephrase.prompts import load_styles
from k2jax.train.checkpoint import Checkpointer
from k2jax.train.step import init_train_state

ROOT = Path(__file__).parents[1]
STYLES = """name: bench
styles:
  - name: plain
    template: "Rewrite the passage in plain words.\\n{previous}\\nPassage: {chunk}\\nRewrite:"
"""
WORDS = "the river carries cold water from the high hills down to a wide valley where farmers grow wheat".split()


def random_run(run: Path) -> None:
    """A run directory of the tiny preset at step 0: config.yaml, tokenizer/, checkpoints/."""
    cfg = load_config(ROOT / "experiments" / "tiny.yaml", [f"train.out_dir={run}"])
    _, state = init_train_state(cfg)
    run.mkdir(parents=True)
    tokenizer_lib.build_tokenizer(cfg.data, []).save(run / "tokenizer")
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    ckpt.save(0, state, {"processes": [{}]}, to_dict(cfg))
    ckpt.close()


def start_server(run: Path, log: Path, max_len: int) -> tuple[subprocess.Popen, str]:
    """`k2jax serve RUN --port 0` and its URL, once /health answers."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "k2jax.cli", "serve", str(run), "--port", "0", "--max-batch",
                                 "16", "--max-len", str(max_len)], cwd=ROOT, stdout=subprocess.PIPE, stderr=f,
                                text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put("")], daemon=True).start()
    try:
        match = re.search(r"http://127\.0\.0\.1:\d+", lines.get(timeout=300))
    except queue.Empty:
        match = None
    if not match:
        proc.kill()
        sys.exit(f"k2jax serve printed no URL:\n{log.read_text()[-3000:]}")
    while httpx.get(f"{match.group()}/health", timeout=5).status_code != 200:
        time.sleep(0.1)
    return proc, match.group()


def rephrase(url: str, client: Client, source: Path, out: Path, styles, concurrency: int, args) -> tuple:
    """(generated tokens, seconds, the server's mean decode batch) of one job; every document is one request."""
    before = httpx.get(f"{url}/stats", timeout=10).json()
    s = Job(str(source), out, client, styles, concurrency=concurrency, chunk_tokens=args.chunk_tokens,
            max_tokens=args.max_tokens, retries=0).run()
    after = httpx.get(f"{url}/stats", timeout=10).json()
    assert s["chunk_attempts"] == args.documents, s
    batch = (after["decode_rows"] - before["decode_rows"]) / max(1, after["decode_calls"] - before["decode_calls"])
    return s["completion_tokens"], s["seconds_this_launch"], batch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated; ratios are to the first")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--chunk-tokens", type=int, default=48, help="each document fits in one chunk")
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open(tmp / "docs.jsonl", "w") as f:
            for _ in range(args.documents):
                f.write(f'{{"text": "{" ".join(rng.choices(WORDS, k=24))}."}}\n')
        (tmp / "styles.yaml").write_text(STYLES)
        styles = load_styles(str(tmp / "styles.yaml"))
        random_run(tmp / "run")
        proc, url = start_server(tmp / "run", tmp / "serve.log", max_len=512)
        try:
            with Client(f"{url}/v1", "run", endpoint="completions", retries=0) as client:
                for c in (1, 2, 4, 8, 16):  # untimed: compiles the prefill of every batch size
                    rephrase(url, client, tmp / "docs.jsonl", tmp / f"warm-{c}", styles, c, args)
                rows = [(c, *rephrase(url, client, tmp / "docs.jsonl", tmp / f"out-{c}", styles, c, args))
                        for c in map(int, args.concurrency.split(","))]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"{args.documents} documents, one request each (max_tokens {args.max_tokens}), `k2jax serve` on a random "
          f"tiny model (--max-batch 16)\n")
    print("| concurrency | tokens | seconds | tokens/s | documents/s | mean decode batch | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    base = rows[0][1] / rows[0][2]
    for c, tokens, seconds, batch in rows:
        print(f"| {c} | {tokens:,} | {seconds:.2f} | {tokens / seconds:,.0f} | {args.documents / seconds:.2f} | "
              f"{batch:.1f} | {tokens / seconds / base:.1f}x |")


if __name__ == "__main__":
    main()
