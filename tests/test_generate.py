"""KV-cached generation: cache vs full recomputation, sampling filters, the engine's scheduling."""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2jax.config import PRESETS, replace
from k2jax.data.tokenizer import ByteTokenizer
from k2jax.inference import cache as cache_lib
from k2jax.inference.engine import Engine, SamplingParams
from k2jax.inference.reference import recompute_greedy
from k2jax.inference.sampling import filtered_logits
from k2jax.model.transformer import Transformer

TINY = replace(PRESETS["tiny"], {"compute_dtype": "float32", "max_seq_len": 512})
KINDS = {
    "mla": TINY,
    "mha": replace(TINY, {"attention.kind": "mha"}),
    "gqa": replace(TINY, {"attention.kind": "gqa", "attention.num_kv_heads": 2}),
}
TOK = ByteTokenizer()
PROMPTS = ["def f(x):\n    return", "import os\n", "class A(object):\n    def __init__(self):"]
TRAINED_LEN = 64  # experiments/tiny.yaml's data.seq_len, which 200 new tokens cross


@pytest.fixture(scope="module", params=list(KINDS))
def model(request):
    """Each attention kind: for what the cache computes."""
    return Transformer(KINDS[request.param], nnx.Rngs(0))


@pytest.fixture(scope="module")
def mla():
    """One model for the engine's scheduling, which does not depend on the attention kind."""
    return Transformer(KINDS["mla"], nnx.Rngs(0))


def test_prefill_then_decode_gives_the_full_forward_logits(model):
    cfg = model.cfg
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
    full = nnx.jit(lambda m, t: m(t)[0])(model, tokens)  # (2, 24, V)
    split = 10  # prefill 10 tokens, then decode the other 14 one at a time
    prefill = nnx.jit(lambda m, t, p, s: m.prefill(t, p, s))
    decode = nnx.jit(lambda m, t, p, v, c: m.decode(t, p, v, c))
    positions = jnp.broadcast_to(jnp.arange(split), (2, split))
    logits, entries = prefill(model, tokens[:, :split], positions, jnp.ones((2, split), jnp.int32))
    cache = cache_lib.insert(cache_lib.new_cache(cfg, 2, 32), entries, jnp.arange(2), cfg)
    got = [logits]
    for t in range(split, 24):
        pos = jnp.full((2, 1), t, jnp.int32)
        step, cache = decode(model, tokens[:, t:t + 1], pos, jnp.ones((2, 1), bool), cache)
        got.append(step)
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, rtol=2e-5, atol=2e-5)


def test_cached_greedy_equals_full_recomputation_for_mixed_lengths_past_the_trained_length(model):
    engine = Engine(model, TOK, max_batch=4, max_len=256, decode_chunk=16, trained_len=TRAINED_LEN)
    with pytest.warns(UserWarning, match="past the 64 tokens per row"):
        out = engine.generate(PROMPTS, SamplingParams(max_tokens=210, temperature=0.0, ignore_eos=True))
    expected = recompute_greedy(model, [engine.encode(p) for p in PROMPTS], 210, TOK.vocab_size)
    for completion, want in zip(out, expected):
        assert completion.finish_reason == "length"
        assert completion.token_ids == want.tolist()
    assert engine.stats["prefill_batches"] == 1 and engine.stats["max_active"] == 3


def test_logprobs_are_the_models_log_softmax(mla):
    engine = Engine(mla, TOK, max_batch=2, max_len=64)
    (c,) = engine.generate(["x = "], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, ignore_eos=True))
    ids = engine.encode("x = ") + c.token_ids
    logits = np.asarray(mla(jnp.asarray([ids]))[0][0], np.float64)[:, :TOK.vocab_size]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    start = len(engine.encode("x = ")) - 1
    want = [logp[start + i, t] for i, t in enumerate(c.token_ids)]
    np.testing.assert_allclose(c.logprobs, want, atol=1e-4)
    assert len(c.top_logprobs) == 3 and all(len(d) <= 2 for d in c.top_logprobs)
    assert max(c.top_logprobs[0].values()) == pytest.approx(c.logprobs[0], abs=1e-5)  # greedy: the best


def test_filtered_logits_match_a_brute_force_top_k_top_p():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 40)).astype(np.float32) * 3
    temperature = np.array([1.0, 0.5, 2.0, 1.0, 0.7], np.float32)
    top_k = np.array([0, 5, 0, 1, 12], np.int32)
    top_p = np.array([0.9, 1.0, 0.3, 1.0, 0.5], np.float32)
    got = np.asarray(filtered_logits(jnp.asarray(logits), temperature, top_k, top_p))
    for row in range(5):
        scaled = logits[row] / temperature[row]
        order = np.argsort(-scaled)
        keep = order[:top_k[row]] if top_k[row] else order
        probs = np.exp(scaled[keep] - scaled[keep].max())
        probs /= probs.sum()
        cut = int(np.searchsorted(np.cumsum(probs), top_p[row]) + 1)  # the token that reaches p is kept
        kept = set(keep[:min(cut, len(keep))].tolist()) if top_p[row] < 1 else set(keep.tolist())
        assert set(np.flatnonzero(np.isfinite(got[row])).tolist()) == kept, row
        np.testing.assert_allclose(got[row][list(kept)], scaled[list(kept)], rtol=1e-6)


def test_seeded_sampling_is_the_same_alone_and_batched_and_top_k_1_is_greedy(mla):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    alone = Engine(mla, TOK, max_batch=1, max_len=64).generate(["def "], params)[0].token_ids
    batched = Engine(mla, TOK, max_batch=4, max_len=64).generate(["import ", "def ", "x"], params)[1].token_ids
    assert alone == batched
    other_seed = Engine(mla, TOK, max_batch=1, max_len=64).generate(
        ["def "], SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True))[0].token_ids
    assert other_seed != alone
    engine = Engine(mla, TOK, max_batch=2, max_len=64)
    top1 = engine.generate(["def "], SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=3, ignore_eos=True))
    greedy = engine.generate(["def "], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert top1[0].token_ids == greedy[0].token_ids


def test_more_requests_than_slots_queue_and_each_stops_on_its_own(mla):
    engine = Engine(mla, TOK, max_batch=2, max_len=64, decode_chunk=4)
    greedy = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    want = engine.generate(["a"], greedy)[0]
    stop_text = want.text[3:5]
    prompts = ["a", "bb", "a", "ccc", "a"]
    params = [greedy, SamplingParams(max_tokens=3, temperature=0.0), SamplingParams(
        max_tokens=9, temperature=0.0, stop=(stop_text,), ignore_eos=True), greedy, greedy]
    requests = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    while engine.step():
        assert engine.stats["active"] <= 2
    done = [r.completion for r in requests]
    assert done[0].token_ids == want.token_ids and done[4].token_ids == want.token_ids
    assert done[1].finish_reason in ("length", "stop") and len(done[1].token_ids) <= 3
    assert done[2].finish_reason == "stop" and stop_text not in done[2].text
    assert want.text.startswith(done[2].text) and len(done[2].text) == want.text.index(stop_text)
    assert engine.stats["prefill_batches"] >= 3 and engine.stats["finished"] == 6


def test_cancel_frees_the_slot_and_eos_stops(mla):
    engine = Engine(mla, TOK, max_batch=1, max_len=128, decode_chunk=4)
    updates = []
    request = engine.submit("def ", SamplingParams(max_tokens=100, ignore_eos=True),
                            on_update=lambda r, new: updates.append(len(new)))
    engine.step()
    engine.step()
    request.cancel()
    engine.step()
    assert request.done.is_set() and request.completion.finish_reason == "cancelled"
    assert engine.stats["active"] == 0 and sum(updates) == len(request.completion.token_ids) > 0
    # eos ends a request without being part of it: make the third greedy token the tokenizer's eos
    greedy = SamplingParams(max_tokens=5, temperature=0.0)
    free = Engine(mla, TOK, max_batch=1, max_len=32).generate(["x"], dataclasses.replace(greedy, ignore_eos=True))[0]

    class EosTokenizer(ByteTokenizer):
        eos_id = free.token_ids[2]

    (c,) = Engine(mla, EosTokenizer(), max_batch=1, max_len=32).generate(["x"], greedy)
    assert c.finish_reason == "stop" and c.token_ids == free.token_ids[:2]


@pytest.mark.parametrize("bad, message", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(logprobs=6), "logprobs"), (dict(stop=("",)), "stop"), (dict(max_tokens=100), "exceeds this engine's max_len"),
])
def test_bad_requests_are_refused_with_the_field_named(mla, bad, message):
    engine = Engine(mla, TOK, max_batch=1, max_len=64)
    with pytest.raises(ValueError, match=message):
        engine.submit("def ", SamplingParams(**bad))
    assert engine.stats["requests"] == 0


def test_serve_forever_answers_from_another_thread(mla):
    engine = Engine(mla, TOK, max_batch=4, max_len=64)
    stop = threading.Event()
    worker = threading.Thread(target=engine.serve_forever, args=(stop,))
    worker.start()
    try:
        requests = [engine.submit(p, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)) for p in "abc"]
        assert all(r.done.wait(120) for r in requests)
    finally:
        stop.set()
        engine.wake()
        worker.join(30)
    assert not worker.is_alive() and all(len(r.completion.token_ids) == 5 for r in requests)


def test_cache_bytes_per_token_for_k2_and_a_full_kv_cache():
    k2 = PRESETS["kimi-k2"]
    assert cache_lib.bytes_per_token(k2) == 61 * (512 + 64) * 2 == 70_272
    assert cache_lib.full_kv_bytes_per_token(k2) / cache_lib.bytes_per_token(k2) == pytest.approx(35.6, abs=0.05)
