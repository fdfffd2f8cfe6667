"""TPU slices without a TPU: the chips' published figures and the compiler's device descriptions.

With libtpu installed, `jax.experimental.topologies` describes the devices of any TPU slice
("v5p:8x8x8") on a CPU-only machine; a mesh built from them lets XLA's TPU compiler compile a
program for that slice, which is how `k2jax plan` sizes pod jobs before renting one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from k2jax.config import ConfigError

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class TpuChip:
    """Vendor figures per chip (Google Cloud TPU documentation)."""

    hbm_bytes: int
    peak_bf16: float  # FLOP/s, dense
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s one way (half the documented bidirectional figure)


TPU_CHIPS = {
    "v4": TpuChip(32 * GIB, 275e12, 1200e9, 300e9),
    "v5e": TpuChip(16 * GIB, 197e12, 819e9, 200e9),
    "v5p": TpuChip(95 * GIB, 459e12, 2765e9, 600e9),
    "v6e": TpuChip(32 * GIB, 918e12, 1638e9, 400e9),
}

LIBTPU_HINT = ("k2jax plan compiles with XLA's TPU compiler, which comes with libtpu: "
               "`pip install libtpu==0.0.42.1` (the build jax 0.10.2 pins; `make venv` installs it)")


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: its name, chip figures and the compiler's device descriptions."""

    name: str
    chip: TpuChip
    devices: list
    chips: int

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.chips

    @property
    def hbm_per_device(self) -> int:
        return self.chip.hbm_bytes // self.devices_per_chip


def tpu_slice(name: str) -> Slice:
    """The slice "GENERATION:AxBxC" (generations in TPU_CHIPS), or a ConfigError saying what is wrong."""
    match = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", name)
    if match is None:
        raise ConfigError(f"--topology: {name!r} is not GENERATION:AxB[xC] (e.g. v5p:8x8x8, v6e:16x16)")
    generation, shape = match.groups()
    if generation not in TPU_CHIPS:
        raise ConfigError(f"--topology: unknown TPU generation {generation!r}; known: {', '.join(TPU_CHIPS)}")
    # a deviceless compile touches no TPU: let several processes load libtpu (test workers), and
    # skip its query of the TPU VM metadata server (absent here; it only prints warnings)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    try:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    except Exception as error:  # noqa: BLE001  (libtpu missing, or a shape the compiler rejects)
        text = str(error)
        if "support not installed" in text:
            raise ConfigError(f"--topology {name}: no TPU compiler here. {LIBTPU_HINT}") from error
        raise ConfigError(f"--topology {name}: the TPU runtime refused it: {text.splitlines()[0]}") from error
    chips = math.prod(int(s) for s in shape.split("x"))
    return Slice(name, TPU_CHIPS[generation], list(devices), chips)
