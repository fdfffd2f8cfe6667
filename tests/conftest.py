"""Suite-wide setup: JAX on the CPU, fast CPU compiles, and one persistent XLA compilation cache for every
process the tests start.

Many tests compile the same small programs in different processes (pytest-xdist workers,
8-device subprocesses, notebook kernels); with the cache each is compiled once per suite run
(and not again in the next run). The tiny train step's first call: 8.9 s cold, 1.7 s from the
cache on the 2-core CPU. The variables are inherited by subprocesses and notebook kernels.
"""

import os
from pathlib import Path

# libtpu is installed (for `k2jax plan`); the tests run on the CPU and must not probe for a TPU
os.environ.setdefault("JAX_PLATFORMS", "cpu")
CACHE_DIR = Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE_DIR))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The tests compile many small programs and run each for a few steps: without LLVM's optimisation
# passes the CPU compiles are faster (tests/test_train.py from an empty cache: 224 s -> 164 s) and
# every result is still checked against a reference compiled with the same flags, or numpy.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402  (after the variables, which jax reads at import)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

MULTIDEVICE = Path(__file__).resolve().parent / "multidevice"


def pytest_ignore_collect(collection_path, config):
    """tests/multidevice needs 8 devices from the start of its process: collected only when named
    (`pytest tests/multidevice`); the suite runs it through tests/test_multidevice.py."""
    if collection_path.resolve() != MULTIDEVICE:
        return None
    named = [Path(config.invocation_params.dir, arg.split("::")[0]).resolve() for arg in config.args]
    return None if any(p == MULTIDEVICE or MULTIDEVICE in p.parents for p in named) else True
