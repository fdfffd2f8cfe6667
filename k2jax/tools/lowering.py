"""Lower a config's train step for an accelerator from any machine: `k2jax lower CONFIG --platform cuda`.

Nothing is allocated: the train state is abstract (shapes, dtypes and shardings), so the
kimi-k2 preset lowers on a laptop. Layers pick the target's kernels (`k2jax.platform`),
JAX lowers the step to StableHLO for that platform, Pallas kernels included, and the
report counts call sites in the program: fused kernels, grouped matmuls, and the
collectives written out explicitly (shard_map; GSPMD adds its own when XLA compiles).
It proves the program lowers; not that XLA compiles it, nor how fast it runs.
"""

from __future__ import annotations

import collections
import re

from k2jax.config import Config
from k2jax.platform import lowering_for
from k2jax.train.step import abstract_batch, abstract_train_state, make_train_step

KERNELS = {"__gpu$xla.gpu.triton": "Triton kernel", "tpu_custom_call": "Mosaic TPU kernel",
           "ragged_all_to_all": "ragged all-to-all"}
OPS = ("ragged_dot", "all_gather", "reduce_scatter", "all_reduce", "all_to_all", "collective_permute")


def lower_train_step(cfg: Config, platform: str):
    """The train step of cfg lowered for platform ("cuda", "rocm", "tpu", "cpu") on this machine's
    devices (fake several with XLA_FLAGS=--xla_force_host_platform_device_count=N for a mesh):
    (jax Lowered, mesh shape)."""
    setup, state = abstract_train_state(cfg)
    step = make_train_step(cfg, setup)
    with lowering_for(platform):
        return step.trace(state, abstract_batch(cfg, setup.mesh)).lower(lowering_platforms=(platform,)), dict(setup.mesh.shape)


def summarize(lowered) -> dict[str, int]:
    """Call sites of custom calls (kernels, by KERNELS' names) and of StableHLO ops of interest."""
    text = lowered.as_text()
    calls = collections.Counter(re.findall(r"custom_call @([^(\s]+)\(", text))
    counts = {label: calls.get(target, 0) for target, label in KERNELS.items()}
    counts.update({op: len(re.findall(rf"\b(?:stablehlo|chlo)\.{op}\b", text)) for op in OPS})
    counts["custom calls"] = sum(calls.values())
    return counts
