"""8 fake CPU devices for every test in this folder.

XLA reads XLA_FLAGS when JAX starts its CPU backend (first use, not `import jax`), so setting it
here still works after tests/conftest.py has imported jax; the check below fails if something
started the backend first. The rest of the suite runs on one device: `pytest tests` collects this
folder only through tests/test_multidevice.py, which runs each file in a pytest process of its own.
"""

import os
import sys
import tempfile

FLAG = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
if FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

if jax.device_count() != 8:
    raise pytest.UsageError(f"tests/multidevice needs 8 CPU devices, JAX started with {jax.device_count()}: "
                            "run it in a pytest process of its own (`pytest tests/multidevice`)")


@pytest.fixture(scope="session")
def tiny_batch():
    """A (16, 64) batch of random byte tokens, one document per row, for experiments/tiny.yaml."""
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(3, 259, (16, 64)), "targets": rng.integers(3, 259, (16, 64)),
             "segment_ids": np.ones((16, 64)), "positions": np.tile(np.arange(64), (16, 1))}
    return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


@pytest.fixture(scope="session")
def stderr_of():
    """stderr_of(fn) -> (fn(), what the process wrote to file descriptor 2 meanwhile): XLA's C++ warnings,
    which capfd cannot see in a module-scoped fixture. The text is passed on to stderr."""

    def run(fn):
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as log:
            os.dup2(log.fileno(), 2)
            try:
                result = fn()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            log.seek(0)
            text = log.read().decode(errors="replace")
        sys.stderr.write(text)
        return result, text

    return run
