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
