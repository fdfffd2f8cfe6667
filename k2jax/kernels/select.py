"""Which implementation runs: one place that reads `execution` and the target platform.

- attention: the plain path (logits materialised; the reference) or a flash kernel: the
  library's Mosaic kernel on TPU, ours in Triton on GPU (interpreted elsewhere, slowly).
- grouped matmul of the dropless MoE: tiled on CPU, megablox on TPU, XLA's ragged_dot on GPU.
- expert dispatch on a mesh: in one program (GSPMD), per shard without an exchange (experts
  whole on every shard), or with an all-gather or ragged all-to-all exchange over the expert axis.
"""

from __future__ import annotations

from k2jax.config import ExecutionConfig
from k2jax.kernels.expert_parallel import (dispatch_all_gather, dispatch_all_to_all, dispatch_local,
                                           expert_parallel_specs, splits_experts)
from k2jax.kernels.flash_attention import MIN_BLOCK, flash_attend
from k2jax.kernels.flash_attention_tpu import BLOCK as TPU_BLOCK
from k2jax.kernels.flash_attention_tpu import flash_attend_tpu
from k2jax.kernels.grouped_matmul import dispatch_ragged
from k2jax.platform import target_platform


def attention_kernel(impl: str, seq_len: int):
    """The fused attention for execution.attention_impl on this platform, or None for the plain path
    ("auto": flash on GPU and TPU when seq_len tiles into the kernel's blocks)."""
    platform = target_platform()
    if impl == "plain":
        return None
    kernel, block = (flash_attend_tpu, TPU_BLOCK) if platform == "tpu" else (flash_attend, MIN_BLOCK)
    if impl == "auto" and (platform not in ("gpu", "tpu") or seq_len % block):
        return None  # e.g. sampling at odd lengths falls back to the plain path
    return kernel


def grouped_matmul_impl(choice: str) -> str:
    """"ragged_dot", "tiled" or "megablox" for execution.grouped_matmul ("auto": tiled on CPU, where
    ragged_dot is lowered densely over all experts; megablox on TPU, where ragged_dot's weight
    gradient is; XLA's ragged dot on GPU)."""
    if choice != "auto":
        return choice
    return {"cpu": "tiled", "tpu": "megablox"}.get(target_platform(), "ragged_dot")


def expert_dispatch(execution: ExecutionConfig, n_tokens: int, expert_shape: tuple[int, int, int], mesh):
    """The dropless dispatch (x (N, D), ids, weights (N, K), experts) -> (y (N, D), dropped share)
    for this mesh (`Transformer.__call__`'s; empty without one) and execution.expert_parallel."""
    impl = grouped_matmul_impl(execution.grouped_matmul)
    specs = None if execution.expert_parallel == "gspmd" else expert_parallel_specs(n_tokens, expert_shape, mesh)
    if specs is None:
        return lambda x, ids, weights, experts: dispatch_ragged(x, ids, weights, *experts, impl)
    if not splits_experts(specs):
        return lambda x, ids, weights, experts: dispatch_local(x, ids, weights, experts, mesh, specs, impl)
    if execution.expert_parallel == "all_to_all":
        return lambda x, ids, weights, experts: dispatch_all_to_all(
            x, ids, weights, experts, mesh, specs, impl, buffer_factor=execution.expert_buffer_factor)
    return lambda x, ids, weights, experts: dispatch_all_gather(x, ids, weights, experts, mesh, specs, impl)
