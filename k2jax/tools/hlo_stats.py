"""What a compiled program does per chip, read off its optimized HLO text.

XLA's own `cost_analysis()` counts a while loop's body once, so on scanned layers it
undercounts (for a TPU train step it also returned negative `optimal_seconds`). Here every
computation is weighted by how often it runs: a while body by its trip count (read off the
loop condition `counter < N`), fusions and calls by their caller's weight. Over that call
graph this module sums

- matmul FLOPs: `dot` (2 x output elements x contracted size) and `convolution` (TPU writes
  most dots as convolutions: 2 x output elements x kernel elements / output features, over
  the window taps that meet input elements, not padding or dilation holes: XLA writes a
  batched matmul as a dilated window that meets one tap, some projections as a padded one);
- collective bytes per kind: the larger of what a device sends and what it receives
  (all-gather: the gathered result; reduce-scatter: the input; all-reduce, all-to-all,
  collective-permute: the buffer; ragged-all-to-all: its input or its output buffer, the larger, not
  the output buffer it is also given as an operand), async `-start` ops counted once, `-done` not at all;
- fused-kernel calls (`custom-call`s to Mosaic or Triton), whose FLOPs are invisible here.

Shapes in post-partitioning HLO are per device, so every figure is per chip.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
               "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")
KERNEL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton")

_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass
class _Instruction:
    name: str
    opcode: str
    arrays: list[tuple[str, tuple[int, ...]]]  # the result's arrays: (dtype, dims)
    operands: list[str]  # operand names
    operand_text: str  # the operand list as written (a constant's literal)
    attributes: str  # everything after the operand list


@dataclasses.dataclass
class HloStats:
    """Per-chip totals of one compiled program, loops multiplied out."""

    flops: float  # dot + convolution FLOPs
    collective_bytes: dict[str, float]  # kind -> bytes
    collective_calls: dict[str, int]  # kind -> executions (loops multiplied out)
    kernel_calls: int  # fused-kernel custom calls executed (FLOPs not in `flops`)
    loops: list[int]  # trip count of every while loop

    @property
    def total_collective_bytes(self) -> float:
        return sum(self.collective_bytes.values())


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_text)
            if dt in DTYPE_BYTES]


def _nbytes(arrays) -> int:
    return sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in arrays)


def _split_call(rest: str) -> tuple[str, str, str, str] | None:
    """'TYPE opcode(operands), attrs' -> (type, opcode, operands, attrs)."""
    match = _OPCODE.search(rest)
    if match is None:
        return None
    start = match.end()
    depth, i = 1, start
    while i < len(rest) and depth:
        depth += {"(": 1, ")": -1}.get(rest[i], 0)
        i += 1
    return rest[:match.start()], match.group(1), rest[start:i - 1], rest[i:]


def parse(text: str) -> tuple[dict[str, list[_Instruction]], str]:
    """Computations by name, each a list of instructions, and the entry computation's name."""
    computations: dict[str, list[_Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header.group(1), [])
            if line.startswith("ENTRY"):
                entry = header.group(1)
            continue
        if line.startswith("}"):
            current = None
            continue
        found = _INSTRUCTION.match(line) if current is not None else None
        parts = _split_call(found.group(2)) if found else None
        if parts:
            type_text, opcode, operands, attributes = parts
            current.append(_Instruction(found.group(1), opcode, _arrays(type_text),
                                        re.findall(r"%([^\s,)]+)", operands), operands, attributes))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _trip_count(condition: list[_Instruction]) -> int:
    """N of a loop condition `counter < N` (JAX's scans and XLA's windowed loops count from 0)."""
    constants = {ins.name: int(ins.operand_text) for ins in condition
                 if ins.opcode == "constant" and re.fullmatch(r"-?\d+", ins.operand_text)}
    for ins in condition:
        if ins.opcode == "compare" and "direction=LT" in ins.attributes:
            for operand in ins.operands:
                if operand in constants:
                    return constants[operand]
    raise ValueError("while loop with no `counter < constant` condition: cannot count its trips")


def _weights(computations, entry) -> tuple[dict[str, float], list[int]]:
    """How many times each computation runs per program execution, and every loop's trip count."""
    weight: dict[str, float] = collections.defaultdict(float)
    loops: list[int] = []

    def visit(name: str, times: float) -> None:
        weight[name] += times
        for ins in computations[name]:
            if ins.opcode == "while":
                body = re.search(r"body=%([^\s,]+)", ins.attributes).group(1)
                trips = _trip_count(computations[re.search(r"condition=%([^\s,]+)", ins.attributes).group(1)])
                loops.append(trips)
                visit(body, times * trips)
            for called in re.findall(r"(?:calls|branch_computations|true_computation|false_computation)="
                                     r"\{?((?:%[^\s,}]+(?:, )?)+)\}?", ins.attributes):
                for callee in re.findall(r"%([^\s,}]+)", called):
                    visit(callee, times)

    visit(entry, 1.0)
    return weight, loops


def _matmul_flops(ins: _Instruction, shapes: dict[str, tuple[int, ...]]) -> float:
    out_shape = ins.arrays[0][1]
    out = math.prod(out_shape)
    if ins.opcode == "dot":
        lhs = shapes[ins.operands[0]]
        dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attributes).group(1)
        return 2.0 * out * math.prod(lhs[int(d)] for d in dims.split(",") if d)
    lhs, kernel = shapes[ins.operands[0]], shapes[ins.operands[1]]
    lhs_labels, kernel_labels, out_labels = re.search(r"dim_labels=([^_]+)_([^-]+)->(\S+?)[,\s]",
                                                      ins.attributes + " ").groups()
    per_output = math.prod(kernel) / kernel[kernel_labels.index("o")]  # input features x window taps
    window = re.search(r"window=\{([^}]*)\}", ins.attributes)
    if window:  # count only the taps that meet input elements (not padding, not dilation holes)
        for k, size in enumerate(_window_field(window.group(1), "size")):
            spatial = str(k)
            taps = _real_taps(lhs[lhs_labels.index(spatial)], out_shape[out_labels.index(spatial)], size,
                              _window_value(window.group(1), "stride", k, 1),
                              _window_value(window.group(1), "pad", k, 0),
                              _window_value(window.group(1), "lhs_dilate", k, 1))
            per_output *= taps / size
    return 2.0 * out * per_output


def _real_taps(length: int, outputs: int, size: int, stride: int, pad_low: int, dilation: int) -> float:
    """Mean number of window taps per output position that land on one of the `length` input
    elements (the input dilated by `dilation`, padded by `pad_low` in front)."""
    position = pad_low + np.arange(length) * dilation  # each input element in padded coordinates
    first = np.maximum(0, -(-(position - size + 1) // stride))  # outputs whose window covers it
    last = np.minimum(outputs - 1, position // stride)
    return float(np.sum(np.maximum(0, last - first + 1))) / outputs


def _window_field(window: str, field: str) -> list[int]:
    found = re.search(rf"\b{field}=([0-9x_]+)", window)
    return [int(v.split("_")[0]) for v in found.group(1).split("x")] if found else []


def _window_value(window: str, field: str, k: int, default: int) -> int:
    values = _window_field(window, field)  # for pad: the low side of "lo_hi"
    return values[k] if values else default


def _collective_bytes(ins: _Instruction, sizes: dict[str, int]) -> int:
    if ins.opcode == "ragged-all-to-all":  # (input, output buffer, offsets and sizes): only the input is sent
        return max(sizes.get(ins.operands[0], 0), _nbytes(ins.arrays))
    sent = sum(sizes.get(op, 0) for op in ins.operands)
    result = _nbytes(ins.arrays)
    received = result - sent if ins.opcode.endswith("-start") else result  # a start's result holds its input
    return max(sent, received)


def analyze(text: str) -> HloStats:
    """Per-chip matmul FLOPs, collective bytes and kernel calls of an optimized HLO module."""
    computations, entry = parse(text)
    weight, loops = _weights(computations, entry)
    flops, kernels = 0.0, 0
    coll_bytes: dict[str, float] = collections.defaultdict(float)
    coll_calls: dict[str, int] = collections.defaultdict(int)
    for name, instructions in computations.items():
        times = weight.get(name, 0.0)
        if not times:
            continue
        shapes = {ins.name: ins.arrays[0][1] for ins in instructions if len(ins.arrays) == 1}
        sizes = {ins.name: _nbytes(ins.arrays) for ins in instructions}
        for ins in instructions:
            kind = ins.opcode.removesuffix("-start")
            if ins.opcode in ("dot", "convolution"):
                flops += times * _matmul_flops(ins, shapes)
            elif kind in COLLECTIVES and not ins.opcode.endswith("-done"):
                coll_bytes[kind] += times * _collective_bytes(ins, sizes)
                coll_calls[kind] += int(times)
            elif ins.opcode == "custom-call" and any(f'"{t}"' in ins.attributes for t in KERNEL_TARGETS):
                kernels += int(times)
    return HloStats(flops, dict(coll_bytes), dict(coll_calls), kernels, loops)
