"""The quantized formats of released Kimi-K2 / DeepSeek-V3 checkpoints, dequantized to float32 in numpy.

- FP8 block-scaled (DeepSeek-V3, Kimi-K2-Base/Instruct; config quant_method "fp8"): `X.weight` float8_e4m3fn
  (out, in) and `X.weight_scale_inv` float32 (ceil(out/128), ceil(in/128)); w = q * scale_inv[i//128, j//128].
- compressed-tensors "pack-quantized" int (Kimi-K2-Thinking / K2.5 routed experts): `X.weight_packed` int32
  (out, ceil(in*bits/32)), `X.weight_scale` (out, groups) bf16/f32, `X.weight_shape` (2,) int = (out, in),
  asymmetric only `X.weight_zero_point` int32 (ceil(out*bits/32), groups); w = (q - zero_point) * scale.
  Packing (compressed_tensors.compressors.pack_quantized.helpers, 0.20.1): element j of a row sits at bits
  [j*bits, (j+1)*bits) of the row's little-endian bit stream (for 4 bits: word j//8, bits 4*(j%8)), stored
  as q + 2**(bits-1) (unsigned). The zero point is packed the same way but along the *output* dim (dim 0).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import ml_dtypes
import numpy as np

from k2jax.interop.deepseek_v3 import InteropError
from k2jax.interop.safetensors_io import SafetensorsDir

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
_PACK_PARAMS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def dequantize_fp8_block(q: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """float32 (out, in) = q (out, in) * scale_inv (ceil(out/bo), ceil(in/bi)) broadcast over its blocks."""
    bo, bi = block
    out, n = q.shape
    if scale_inv.shape != (math.ceil(out / bo), math.ceil(n / bi)):
        raise InteropError(f"block scales of shape {scale_inv.shape} do not fit a {q.shape} weight in {bo}x{bi} "
                           f"blocks (expected {(math.ceil(out / bo), math.ceil(n / bi))})")
    w = np.asarray(q).astype(np.float32)
    scale = np.asarray(scale_inv, np.float32)
    for r in range(scale.shape[0]):
        w[r * bo:(r + 1) * bo] *= np.repeat(scale[r], bi)[:n]  # (in,)
    return w


def quantize_fp8_block(w: np.ndarray, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """(q float8_e4m3fn (out, in), scale_inv float32 (ceil(out/bo), ceil(in/bi))): scale_inv = block amax / 448
    (1 for an all-zero block), q = w / scale_inv clipped to +-448, rounded to nearest even."""
    bo, bi = block
    w = np.asarray(w, np.float32)
    out, n = w.shape
    nr, nc = math.ceil(out / bo), math.ceil(n / bi)
    blocks = np.zeros((nr * bo, nc * bi), np.float32)
    blocks[:out, :n] = w
    blocks = blocks.reshape(nr, bo, nc, bi)
    amax = np.abs(blocks).max(axis=(1, 3))  # (nr, nc)
    scale_inv = np.where(amax > 0, amax / FP8_MAX, 1).astype(np.float32)
    q = np.clip(blocks / scale_inv[:, None, :, None], -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return np.ascontiguousarray(q.reshape(nr * bo, nc * bi)[:out, :n]), scale_inv


def _unpack_int32(packed: np.ndarray, num_bits: int, cols: int) -> np.ndarray:
    """The signed values, as float32 (rows, cols), of densely packed int32 rows (rows, ceil(cols*num_bits/32))."""
    rows = packed.shape[0]
    raw = np.ascontiguousarray(packed, "<i4").view(np.uint8).reshape(rows, -1)  # the little-endian bit stream
    if num_bits == 4:  # the common case, 4x faster than through the bits
        vals = np.empty((rows, raw.shape[1] * 2), np.float32)
        vals[:, 0::2] = raw & 0xF
        vals[:, 1::2] = raw >> 4
    else:
        bits = np.unpackbits(raw, axis=1, bitorder="little")[:, :cols * num_bits]
        vals = np.packbits(bits.reshape(rows, cols, num_bits), axis=2, bitorder="little")[:, :, 0].astype(np.float32)
    vals -= 1 << (num_bits - 1)
    return vals[:, :cols]


def dequantize_pack_quantized(packed: np.ndarray, scale: np.ndarray, shape, zero_point: np.ndarray | None = None,
                              num_bits: int = 4, group_size: int | None = None) -> np.ndarray:
    """float32 (out, in) of a compressed-tensors pack-quantized weight: packed int32 (out, ceil(in*bits/32)),
    scale (out, groups), shape = weight_shape (out, in), zero_point packed int32 (ceil(out*bits/32), groups)
    or None (symmetric). group_size None/-1: in / groups (1 group: per channel)."""
    dims = tuple(int(d) for d in np.asarray(shape).reshape(-1))
    if len(dims) != 2 or not 1 <= num_bits <= 8:
        raise InteropError(f"pack-quantized weights are 2-D with 1..8 bits, not shape {dims} with {num_bits} bits")
    out, n = dims
    if packed.dtype != np.int32 or packed.shape != (out, math.ceil(n * num_bits / 32)):
        raise InteropError(f"packed weight {packed.dtype} {packed.shape} does not hold a {dims} weight of "
                           f"{num_bits}-bit values (expected int32 {(out, math.ceil(n * num_bits / 32))})")
    groups = scale.shape[-1] if scale.ndim == 2 else 0
    size = group_size if group_size and group_size > 0 else n // max(groups, 1)
    if scale.shape != (out, groups) or groups * size != n:
        raise InteropError(f"scales of shape {scale.shape} do not fit a {dims} weight in groups of {size}")
    w = _unpack_int32(packed, num_bits, n).reshape(out, groups, size)
    if zero_point is not None:
        zp_shape = (math.ceil(out * num_bits / 32), groups)
        if zero_point.dtype != np.int32 or zero_point.shape != zp_shape:
            raise InteropError(f"zero points {zero_point.dtype} {zero_point.shape} do not fit {groups} groups of "
                               f"{out} rows packed along the rows (expected int32 {zp_shape})")
        w -= _unpack_int32(zero_point.T, num_bits, out).T[:, :, None]  # (out, groups, 1)
    w *= np.asarray(scale, np.float32)[:, :, None]
    return w.reshape(out, n)


class WeightReader:
    """A checkpoint directory as its float checkpoint would look: one logical `X.weight` per quantized module
    (with the physical tensors it consumes), every other stored tensor as itself; reads dequantize."""

    def __init__(self, directory: str | Path):
        self.files = SafetensorsDir(directory)
        config_path = Path(directory) / "config.json"
        qc = json.loads(config_path.read_text()).get("quantization_config") if config_path.exists() else None
        method = (qc or {}).get("quant_method")
        # logical name -> (stored format, stored names, pack-quantized (bits, group size or None))
        self._logical: dict[str, tuple[str, tuple[str, ...], tuple | None]] = {}
        if method == "fp8":
            if qc.get("fmt", "e4m3") != "e4m3" or len(qc.get("weight_block_size") or ()) != 2:
                raise InteropError(f"unsupported fp8 quantization_config: fmt {qc.get('fmt')!r}, "
                                   f"weight_block_size {qc.get('weight_block_size')!r}")
            self.block = tuple(int(b) for b in qc["weight_block_size"])
            self._find_fp8()
        elif method == "compressed-tensors":
            self._groups = list(qc.get("config_groups", {}).values())
            for fmt in {g.get("format") or qc.get("format") for g in self._groups}:
                if fmt != "pack-quantized":
                    raise InteropError(f"unsupported compressed-tensors format {fmt!r} (supported: pack-quantized)")
            self._find_pack_quantized()
        elif qc is not None:
            raise InteropError(f"unsupported quant_method {method!r} in {config_path} (supported: fp8, "
                               f"compressed-tensors)")
        consumed = {s for _, stored, _ in self._logical.values() for s in stored}
        for name in self.files.names():
            if name in consumed:
                continue
            if name in self._logical:
                raise InteropError(f"{name} is stored both as a float tensor and quantized")
            if self.files.dtype(name) == "F8_E4M3":
                raise InteropError(f"{name} is float8 without block scales ({name}_scale_inv)")
            self._logical[name] = ("float", (name,), None)
        self._names = sorted(self._logical)
        self._shapes: dict[str, tuple[int, ...]] = {}

    def _find_fp8(self) -> None:
        for scale in self.files.names():
            if not scale.endswith(".weight_scale_inv"):
                continue
            weight = scale.removesuffix("_scale_inv")
            if weight not in self.files or self.files.dtype(weight) != "F8_E4M3":
                raise InteropError(f"{scale} has no float8_e4m3 weight {weight} "
                                   f"({self.files.dtype(weight) if weight in self.files else 'missing'})")
            w_shape = self.files.shape(weight)
            expected = tuple(math.ceil(d / b) for d, b in zip(w_shape, self.block))
            if len(w_shape) != 2 or self.files.shape(scale) != expected:
                raise InteropError(f"{scale} has shape {self.files.shape(scale)}; a {w_shape} weight in "
                                   f"{self.block} blocks needs {expected}")
            self._logical[weight] = ("fp8_block", (weight, scale), None)

    def _scheme(self, module: str) -> dict:
        """The weights args of the config group that targets `module` most specifically, as compressed-tensors
        ranks targets: the exact name, then a "re:" regex, then the class "Linear" (every quantized module)."""
        ranked = []
        for i, group in enumerate(self._groups):
            targets = group.get("targets") or []
            regex = any(t.startswith("re:") and re.match(t[3:], module) for t in targets)
            rank = 0 if module in targets else 1 if regex else 2 if "Linear" in targets else None
            if rank is not None and group.get("weights"):
                ranked.append((rank, i, group["weights"]))
        if not ranked:
            raise InteropError(f"{module}.weight_packed: no quantization_config.config_groups entry targets "
                               f"{module}")
        return min(ranked, key=lambda r: r[:2])[2]

    def _find_pack_quantized(self) -> None:
        for packed in self.files.names():
            if not packed.endswith(".weight_packed"):
                continue
            module = packed.removesuffix(".weight_packed")
            args = self._scheme(module)
            bits, kind, strategy = int(args.get("num_bits", 8)), args.get("type", "int"), args.get("strategy")
            if kind != "int" or strategy not in ("group", "channel") or not 1 <= bits <= 8:
                raise InteropError(f"{module}: unsupported pack-quantized weights: type {kind!r}, "
                                   f"{bits} bits, strategy {strategy!r}")
            symmetric = bool(args.get("symmetric", True))
            stored = tuple(f"{module}.{p}" for p in _PACK_PARAMS if f"{module}.{p}" in self.files)
            expected = tuple(f"{module}.{p}" for p in _PACK_PARAMS[:3 if symmetric else 4])
            if stored != expected:
                raise InteropError(f"{module}: {'symmetric' if symmetric else 'asymmetric'} pack-quantized "
                                   f"weights are stored as {list(expected)}, found {list(stored)}")
            group_size = args.get("group_size") if strategy == "group" else None  # None: the whole row
            self._logical[f"{module}.weight"] = ("int4_pack", stored, (bits, group_size))

    def logical_names(self) -> list[str]:
        """Every tensor name of the float checkpoint this one stands for, sorted."""
        return list(self._names)

    def _get(self, name: str):
        try:
            return self._logical[name]
        except KeyError:
            raise InteropError(f"no tensor {name!r} in {self.files.directory}") from None

    def stored_format(self, name: str) -> str:
        """"float", "fp8_block" or "int4_pack" (any pack-quantized bit width)."""
        return self._get(name)[0]

    def stored_names(self, name: str) -> tuple[str, ...]:
        """The stored tensors that `name` is made of."""
        return self._get(name)[1]

    def shape(self, name: str) -> tuple[int, ...]:
        """The logical shape, without reading the weight (pack-quantized: reads the tiny weight_shape)."""
        fmt, stored, _ = self._get(name)
        if fmt != "int4_pack":
            return self.files.shape(stored[0])
        if name not in self._shapes:
            self._shapes[name] = tuple(int(d) for d in self.files.read(stored[2]).reshape(-1))
        return self._shapes[name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every logical name with its shape (no weight read)."""
        return {name: self.shape(name) for name in self._names}

    def read(self, name: str, dtype=np.float32) -> np.ndarray:
        """The tensor as the float checkpoint holds it, dequantized and cast to `dtype`."""
        fmt, stored, args = self._get(name)
        arrays = [self.files.read(s) for s in stored]
        try:
            if fmt == "fp8_block":
                return dequantize_fp8_block(*arrays, block=self.block).astype(dtype, copy=False)
            if fmt == "int4_pack":
                bits, group_size = args
                return dequantize_pack_quantized(*arrays, num_bits=bits, group_size=group_size or self.shape(name)[1]
                                                 ).astype(dtype, copy=False)
        except InteropError as e:
            raise InteropError(f"{name}: {e}") from None
        return arrays[0].astype(dtype, copy=False)
