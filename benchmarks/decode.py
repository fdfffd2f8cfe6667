"""KV-cached decoding against full recomputation, tokens/s against batch size, cache sizes.

    .venv/bin/python benchmarks/decode.py                      # small and medium, batch 1 and 16
    .venv/bin/python benchmarks/decode.py --presets small --batches 1,4,16,64

Models are randomly initialised (speed does not depend on the weights); every arm is greedy,
ignores eos and produces exactly --new-tokens tokens per prompt. The presets compute in bfloat16,
where the absorbed (cached) and materialised (recompute) MLA round differently, and a random
model's near-flat logits turn that into a different argmax now and then: the last column counts
rows that agree to the end (tests/test_generate.py checks exact agreement in float32). Each arm runs once to compile,
then is timed over --repeats runs (the median is reported); ratios are taken within this one
run, so a busy machine slows both arms alike. The cache-size table needs no timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

from k2jax.config import PRESETS
from k2jax.inference import cache as cache_lib
from k2jax.inference.engine import Engine, SamplingParams
from k2jax.inference.reference import recompute_greedy
from k2jax.model.transformer import Transformer


class _Tokenizer:
    """Enough of a tokenizer for id prompts: no eos, the model's whole vocabulary."""

    bos_id, eos_id = None, None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def _median_seconds(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _prompts(cfg, batch: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return rng.integers(0, cfg.vocab_size, (batch, length)).tolist()


def _cached(model, prompts, new_tokens: int, chunk: int):
    engine = Engine(model, _Tokenizer(model.cfg.vocab_size), max_batch=len(prompts),
                    max_len=len(prompts[0]) + new_tokens, decode_chunk=chunk)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return lambda: engine.generate(prompts, params)


def cached_vs_recompute(presets, batches, prompt_len: int, new_tokens: int, repeats: int, chunk: int,
                        skip: set[str]) -> None:
    print(f"## cached vs full recomputation: {prompt_len}-token prompts, {new_tokens} new tokens, greedy")
    print("| preset | batch | recompute s | cached s | speed-up | cached tokens/s | rows with identical tokens |")
    print("|---|---|---|---|---|---|---|")
    for name in presets:
        model = Transformer(PRESETS[name], nnx.Rngs(0))
        for batch in batches:
            prompts = _prompts(model.cfg, batch, prompt_len)
            cached = _cached(model, prompts, new_tokens, chunk)
            t_cached = _median_seconds(cached, repeats)
            if f"{name}:{batch}" in skip:
                print(f"| {name} | {batch} | (skipped) | {t_cached:.2f} | | {batch * new_tokens / t_cached:,.0f} | |",
                      flush=True)
                continue
            t_full = _median_seconds(lambda: recompute_greedy(model, prompts, new_tokens), repeats)
            reference = recompute_greedy(model, prompts, new_tokens).tolist()
            same = sum(c.token_ids == r for c, r in zip(cached(), reference))
            print(f"| {name} | {batch} | {t_full:.2f} | {t_cached:.2f} | {t_full / t_cached:.1f}x | "
                  f"{batch * new_tokens / t_cached:,.0f} | {same}/{batch} |", flush=True)


def throughput_by_batch(presets, batches, prompt_len: int, new_tokens: int, repeats: int, chunk: int) -> None:
    print(f"\n## cached decoding: tokens/s against batch size ({prompt_len}-token prompts, {new_tokens} new)")
    print("| preset | batch | s | tokens/s | vs batch 1 |")
    print("|---|---|---|---|---|")
    for name in presets:
        model = Transformer(PRESETS[name], nnx.Rngs(0))
        base = None
        for batch in batches:
            prompts = _prompts(model.cfg, batch, prompt_len)
            seconds = _median_seconds(_cached(model, prompts, new_tokens, chunk), repeats)
            rate = batch * new_tokens / seconds
            base = base or rate
            print(f"| {name} | {batch} | {seconds:.2f} | {rate:,.0f} | {rate / base:.1f}x |", flush=True)


def cache_sizes(batch: int, context: int) -> None:
    print(f"\n## cache bytes per token (compute dtype), and for {batch} x {context:,}-token contexts")
    print("| preset | attention | bytes/token | full K/V bytes/token | ratio | batch x context |")
    print("|---|---|---|---|---|---|")
    for name, cfg in PRESETS.items():
        ours, full = cache_lib.bytes_per_token(cfg), cache_lib.full_kv_bytes_per_token(cfg)
        print(f"| {name} | {cfg.attention.kind} | {ours:,} | {full:,} | {full / ours:.1f}x | "
              f"{ours * batch * context / 2**30:,.1f} GiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="small,medium")
    parser.add_argument("--batches", default="1,16", help="batch sizes of the cached-vs-recompute table")
    parser.add_argument("--throughput-batches", default="1,4,16")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-recompute", default="medium:16", help="PRESET:BATCH pairs whose recompute arm is "
                        "not run (medium at batch 16: about 16 x 256 forward passes of 272 tokens, over half an hour "
                        "on a 2-core CPU)")
    parser.add_argument("--decode-chunk", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768, help="context length of the cache-size table")
    parser.add_argument("--context-batch", type=int, default=32)
    args = parser.parse_args()
    print(f"devices: {jax.devices()}")
    presets = args.presets.split(",")
    cache_sizes(args.context_batch, args.context)
    cached_vs_recompute(presets, [int(b) for b in args.batches.split(",")], args.prompt_len, args.new_tokens,
                        args.repeats, args.decode_chunk, set(filter(None, args.skip_recompute.split(","))))
    throughput_by_batch(presets, [int(b) for b in args.throughput_batches.split(",")], args.prompt_len,
                        args.new_tokens, args.repeats, args.decode_chunk)


if __name__ == "__main__":
    main()
