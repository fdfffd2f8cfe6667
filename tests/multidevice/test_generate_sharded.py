"""KV-cached generation on a mesh: the cache split over the batch axes, experts over the expert axis,
the same greedy tokens as one device."""

import jax
import pytest

from k2jax.config import load_config
from k2jax.data.tokenizer import ByteTokenizer
from k2jax.generate import _with_weights
from k2jax.inference.engine import Engine, SamplingParams, decode_chunk_program
from k2jax.train.step import init_train_state

PROMPTS = ["def f(x):", "import os\n", "a", "class B:", "x = [", "#"]


@pytest.mark.parametrize("mesh, batch_shards", [(dict(data=2, expert=4), 8), (dict(fsdp=2, expert=2, tensor=2), 4)])
def test_sharded_engine_generates_what_one_device_does(mesh, batch_shards):
    overrides = [f"mesh.{k}={mesh.get(k, 1)}" for k in ("data", "fsdp", "expert", "tensor")]
    cfg = load_config("experiments/tiny.yaml", overrides + ["model.compute_dtype=float32"])
    setup, state = init_train_state(cfg)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine = Engine(_with_weights(cfg, state["params"], state["model_state"]), ByteTokenizer(), max_batch=3,
                    max_len=64, mesh=setup.mesh)
    assert engine.max_batch == batch_shards  # 3 slots rounded up to the batch shards (data/fsdp x expert)
    cache = jax.tree.leaves(engine._cache)[0]  # (L, B, S, C): one slot per batch shard, heads never split
    assert len(cache.sharding.device_set) == 8 and cache.addressable_shards[0].data.shape[1] == 1
    engine.warm_up()
    decode_programs = decode_chunk_program._cache_size()
    sharded = engine.generate(PROMPTS, params)
    assert decode_chunk_program._cache_size() == decode_programs  # the cache comes back placed as it went in
    local = _with_weights(cfg, jax.device_get(state["params"]), jax.device_get(state["model_state"]))
    single = Engine(local, ByteTokenizer(), max_batch=8, max_len=64).generate(PROMPTS, params)
    assert [c.token_ids for c in sharded] == [c.token_ids for c in single]
