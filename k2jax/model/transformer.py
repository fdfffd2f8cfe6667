"""The K2 / DeepSeek-V3 style decoder: embeddings, dense then MoE blocks, output head.

The forward pass returns logits and the statistics the training step needs:
per-layer, per-head max attention logits (for QK-Clip), per-layer expert loads
(for the balancing bias and metrics) and the router losses.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config import ExecutionConfig, ModelConfig
from k2jax.model.attention import Attention
from k2jax.model.layers import Embed, ParamInit, RMSNorm, SwiGLU, make_param
from k2jax.model.moe import MoE, new_router_bias
from k2jax.model.rope import rope_tables
from k2jax.model.stats import ForwardStats, over_layers

DENSE, MOE = "dense_layers", "moe_layers"
_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)) (dense or MoE)."""

    def __init__(self, cfg: ModelConfig, execution: ExecutionConfig, *, moe: bool, stats_key: str, rngs: nnx.Rngs):
        self.is_moe = moe
        init = ParamInit.of(cfg)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps, init, rngs)
        self.attn = Attention(cfg, stats_key=stats_key, rngs=rngs, execution=execution)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.rms_eps, init, rngs)
        self.ffn = MoE(cfg, rngs, execution) if moe else SwiGLU(cfg.d_model, cfg.dense_ffn_dim, init, rngs)

    def __call__(self, x, rope, segment_ids):
        x, stats, _ = self.prefill(x, rope, segment_ids)
        return x, stats

    def prefill(self, x, rope, segment_ids):
        """The training forward, plus the attention cache entries of these tokens."""
        h, max_logits, entries = self.attn.prefill(self.attn_norm(x), rope, segment_ids)  # (B, T, D), (H,)
        x, stats = self._ffn(x + h, segment_ids > 0)
        return x, stats.replace(max_logits=max_logits), entries

    def decode(self, x, rope, positions, valid, cache):
        """x (B, T, D) of new tokens at positions (B, T) -> x, the cache with their entries."""
        h, cache = self.attn.decode(self.attn_norm(x), rope, positions, cache)
        x, _ = self._ffn(x + h, valid)
        return x, cache

    def _ffn(self, x, valid):
        if self.is_moe:
            h, stats = self.ffn(self.ffn_norm(x), valid)
        else:
            h, stats = self.ffn(self.ffn_norm(x)), ForwardStats()
        return x + h, stats


def _stacked_blocks(cfg: ModelConfig, execution: ExecutionConfig, n: int, moe: bool, key: str,
                    rngs: nnx.Rngs) -> Block:
    """n blocks with parameters stacked on a leading "layers" axis (for nnx.scan)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return Block(cfg, execution, moe=moe, stats_key=key, rngs=rngs)

    return make(rngs)


class Transformer(nnx.Module):
    """tokens (B, T) -> logits (B, T, V), stats.

    `cfg` says what the model computes, `execution` how (kernels, recomputation, the expert exchange);
    the parameters do not depend on `execution`.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, execution: ExecutionConfig = ExecutionConfig()):
        self.cfg = cfg
        self.execution = execution
        init = ParamInit.of(cfg)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.compute_dtype, init, rngs)
        self.dense_layers = self._make_stack(DENSE, cfg.num_dense_layers, False, rngs)
        self.moe_layers = self._make_stack(MOE, cfg.num_moe_layers, True, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_eps, init, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = make_param(rngs, (cfg.d_model, cfg.vocab_size), init, axes=("embed", "vocab"),
                                      kind="unembedding")

    def _make_stack(self, name, n, moe, rngs):
        if n == 0:
            return None
        if self.cfg.scan_layers:
            return _stacked_blocks(self.cfg, self.execution, n, moe, name, rngs)
        return nnx.List([Block(self.cfg, self.execution, moe=moe, stats_key=f"{name}.{i}", rngs=rngs)
                         for i in range(n)])

    def _run_stack(self, name, stack, x, layer_fn, layer_inputs, outputs):
        """Run a stack: layer_fn(x, block, layer_input) -> (x, layer_output) for each block; the outputs
        (and inputs) are keyed like the params' stats_key, stacked on a leading L axis when scanned."""
        if stack is None:
            return x
        if not self.cfg.scan_layers:
            for i, block in enumerate(stack):
                key = f"{name}.{i}"
                x, outputs[key] = layer_fn(x, block, layer_inputs.get(key))
            return x
        scan = nnx.scan(layer_fn, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                        transform_metadata={nnx.PARTITION_NAME: "layers"})
        x, outputs[name] = scan(x, stack, layer_inputs.get(name))
        return x

    def _stacks(self):
        return ((DENSE, self.dense_layers), (MOE, self.moe_layers))

    def _maybe_remat(self, fn):
        if self.execution.remat == "none":
            return fn
        return nnx.remat(fn, policy=_REMAT_POLICIES[self.execution.remat])

    def __call__(self, tokens, positions=None, segment_ids=None, *, mesh=None):
        """tokens, positions, segment_ids: int32 (B, T); segment 0 marks padding.

        mesh: the device mesh (Mesh or AbstractMesh) the call is traced for, on which the parameters
        and tokens live (as the train step places them). With one, the layers lay out their work on
        it explicitly: the MoE exchanges tokens with collectives under shard_map
        (execution.expert_parallel), the flash kernels run per shard, the embedding gathers its FSDP
        shards first. Without one the model is a single program, which GSPMD partitions as it can
        (slower on a mesh, same results). The layers read it as the ambient abstract mesh, which this
        call sets; a caller may instead set it (`jax.sharding.use_abstract_mesh`) around the call.

        Returns logits (B, T, V) in float32 and a `ForwardStats` (k2jax.model.stats: its fields, their
        shapes and how they combine over layers), per-layer values keyed like the params' stats_key.
        """
        with _traced_for(mesh):
            return self._forward(tokens, positions, segment_ids)

    def _forward(self, tokens, positions, segment_ids):
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        rope = rope_tables(self.cfg, positions)

        def layer(x, block, _):
            return block(x, rope, segment_ids)

        x = self.embed(tokens)
        per_layer: dict = {}
        for name, stack in self._stacks():
            x = self._run_stack(name, stack, x, self._maybe_remat(layer), {}, per_layer)
        return self._logits(x), over_layers(per_layer)

    def prefill(self, tokens, positions, segment_ids, *, mesh=None):
        """The forward pass that also returns every layer's attention cache entries for these tokens:
        tokens, positions, segment_ids (B, T) -> logits (B, T, V) float32, entries {key: {field: (L?, B, T, ...)}}
        (keys as in the stats; `cache_layout` names the fields)."""
        with _traced_for(mesh):
            rope = rope_tables(self.cfg, positions)

            def layer(x, block, _):
                x, _, entries = block.prefill(x, rope, segment_ids)
                return x, entries

            x = self.embed(tokens)
            entries: dict = {}
            for name, stack in self._stacks():
                x = self._run_stack(name, stack, x, layer, {}, entries)
            return self._logits(x), entries

    def decode(self, tokens, positions, valid, cache, *, mesh=None):
        """New tokens against a cache (`inference.cache.new_cache`): tokens, positions (B, T) int32,
        valid (B, T) bool (rows without a request) -> logits (B, T, V) float32, the updated cache."""
        with _traced_for(mesh):
            rope = rope_tables(self.cfg, positions)

            def layer(x, block, layer_cache):
                return block.decode(x, rope, positions, valid, layer_cache)

            def scanned_layer(carry, block):  # the stack's cache rides in the carry, updated in place
                x, stack_cache, i = carry
                x, layer_cache = layer(x, block, jax.tree.map(lambda c: c[i], stack_cache))
                stack_cache = jax.tree.map(lambda c, n: jax.lax.dynamic_update_index_in_dim(c, n, i, 0),
                                           stack_cache, layer_cache)
                return (x, stack_cache, i + 1), ()

            x = self.embed(tokens)
            new_cache: dict = {}
            for name, stack in self._stacks():
                if stack is None or not self.cfg.scan_layers:
                    x = self._run_stack(name, stack, x, layer, cache, new_cache)
                    continue
                scan = nnx.scan(scanned_layer, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                                transform_metadata={nnx.PARTITION_NAME: "layers"})
                (x, new_cache[name], _), _ = scan((x, cache[name], jnp.zeros((), jnp.int32)), stack)
            return self._logits(x), new_cache

    def _logits(self, x):
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = x @ self.lm_head[...].astype(x.dtype)
        return logits.astype(jnp.float32)

    def moe_blocks(self):
        """(stats key, block) for every MoE stack or layer, matching stats.expert_counts."""
        if self.moe_layers is None:
            return []
        if self.cfg.scan_layers:
            return [(MOE, self.moe_layers)]
        return [(f"{MOE}.{i}", blk) for i, blk in enumerate(self.moe_layers)]

    def update_router_biases(self, stats: ForwardStats) -> None:
        """Move each MoE layer's selection bias toward equal load (sigmoid router), per
        model.moe.router_balance, from a step's stats (expert_counts and, for quantile, balance_hist)."""
        if self.cfg.moe.router != "sigmoid_bias":
            return
        for key, block in self.moe_blocks():
            block.ffn.bias.value = new_router_bias(block.ffn.bias.value, stats.layer(key), self.cfg.moe)


def _traced_for(mesh):
    """The context that makes `mesh` the ambient abstract mesh the layers read (nothing for None)."""
    if mesh is None:
        return contextlib.nullcontext()
    abstract = getattr(mesh, "abstract_mesh", mesh)
    ambient = jax.sharding.get_abstract_mesh()
    if not ambient.empty and ambient != abstract:
        raise ValueError(f"Transformer called with mesh {abstract} inside another ambient mesh {ambient}")
    return jax.sharding.use_abstract_mesh(abstract)
