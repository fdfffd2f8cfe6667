"""How balanced can a token-choice router get on the default run's data? (docs/model.md: Load balancing)

Trains the default run with Quantile Balancing and, at steps 30, 60 and 120, holds the weights
fixed and solves the bias eight times on that step's own batch: the worst MoE layer's max/mean
load after the last solve is what no bias can beat on that batch (identical tokens route
identically). Prints the first and last solve per layer and the share of the most common byte.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/balance_floor.py      # ~3 min on 2 cores
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2jax.config import load_config
from k2jax.data import corpus as corpus_lib
from k2jax.data import pipeline, tokenizer as tokenizer_lib
from k2jax.model.moe import new_router_bias
from k2jax.train.step import init_train_state, make_train_step

SOLVES, PROBE_STEPS = 8, (30, 60, 120)


def main():
    cfg = load_config("experiments/default.yaml", ["train.out_dir=/tmp/balance_floor"])
    setup, state = init_train_state(cfg)
    train_docs, _ = corpus_lib.load_corpus(cfg.data)
    tok = tokenizer_lib.build_tokenizer(cfg.data, train_docs)
    chunks = pipeline.chunk_documents(tok, train_docs, cfg.data.seq_len)
    batches = pipeline.train_iterator(chunks, cfg.data.seq_len, cfg.train.batch_size, seed=0)
    step = make_train_step(cfg, setup)
    stats_of = jax.jit(lambda p, ms, b: nnx.merge(setup.graphdef, p, ms)(
        b["inputs"], b["positions"], b["segment_ids"])[1])
    for t in range(1, max(PROBE_STEPS) + 1):
        batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
        state, _ = step(state, batch)
        if t not in PROBE_STEPS:
            continue
        model_state, loads = jax.tree.map(jnp.copy, state["model_state"]), []
        for _ in range(SOLVES):
            stats = stats_of(state["params"], model_state, batch)
            counts = np.asarray(stats.expert_counts["moe_layers"], np.float64)
            loads.append(np.round(counts.max(-1) / counts.mean(-1), 2).tolist())
            ffn = model_state["moe_layers"]["ffn"]
            ffn["bias"] = new_router_bias(ffn["bias"], stats.layer("moe_layers"), cfg.model.moe)
        _, counts = np.unique(np.asarray(batch["inputs"]), return_counts=True)
        print(f"step {t}: max/mean per MoE layer {loads[0]} -> {loads[-1]} after {SOLVES} solves on the same "
              f"batch; most common byte {counts.max() / counts.sum():.1%} of the batch", flush=True)


if __name__ == "__main__":
    main()
