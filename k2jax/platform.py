"""The platform a program is traced for, where kernel choices are made.

Layers pick their kernels while tracing (flash attention on GPU, the tiled grouped
matmul on CPU). They ask `target_platform()`, which is `jax.default_backend()` unless a
`lowering_for(...)` block names another platform: then a CPU-only machine traces the
accelerator's program, and `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`
(or jax.export) checks that it lowers there, Pallas kernels included, without the device.
A jitted function caches its first trace whatever the platform: lower a fresh one.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os

import jax

PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}
_target: contextvars.ContextVar[str | None] = contextvars.ContextVar("k2jax_target_platform", default=None)


def target_platform() -> str:
    """"cpu", "gpu" or "tpu": the platform the code being traced will run on."""
    return _target.get() or jax.default_backend()


@contextlib.contextmanager
def lowering_for(platform: str):
    """Trace for `platform` ("cpu", "gpu"/"cuda"/"rocm", "tpu") inside this block."""
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; expected one of {sorted(PLATFORMS)}")
    token = _target.set(PLATFORMS[platform])
    try:
        yield
    finally:
        _target.reset(token)


def skip_absent_tpu() -> None:
    """On a machine with no TPU chips and no GPU plugin, run JAX on the CPU (JAX_PLATFORMS=cpu)
    unless the user chose platforms. libtpu is installed for `k2jax plan`; left alone, JAX
    starts the TPU runtime at its first device query, which prints five lines of errors about
    missing TPU hosts before falling back to the CPU. Call before JAX creates its backends."""
    from jax._src import hardware_utils  # the PCI scan JAX itself runs on Cloud TPU VMs

    gpu_plugin = any(importlib.util.find_spec(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                                    "jax_rocm7_plugin"))
    if "JAX_PLATFORMS" not in os.environ and not gpu_plugin \
            and hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")
