"""Lazy reading and atomic writing of *.safetensors checkpoint directories, one tensor at a time.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of
JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}} (offsets relative
to the data that follows the header), then the little-endian tensor bytes. Only the headers are read at
open; `read` seeks to one tensor's byte range and reads it into a fresh array (no mmap). Little-endian
hosts only.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from k2jax.interop.deepseek_v3 import InteropError

INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100_000_000  # the limit of the reference implementation

DTYPES: dict[str, np.dtype] = {code: np.dtype(t) for code, t in {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}.items()}
_CODES = {dt: code for code, dt in DTYPES.items()}


class _Entry:
    """Where one tensor lies: its file, dtype code, shape and absolute byte range."""

    __slots__ = ("path", "dtype", "shape", "start", "nbytes")

    def __init__(self, path: Path, dtype: str, shape: tuple[int, ...], start: int, nbytes: int):
        self.path, self.dtype, self.shape, self.start, self.nbytes = path, dtype, shape, start, nbytes


def _read_header(path: Path) -> dict[str, _Entry]:
    """The tensors of one safetensors file, from its header; InteropError for a bad or truncated file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, _MAX_HEADER):
                raise InteropError(f"{path}: not a safetensors file (truncated, or bad header length {n})")
            raw = f.read(n)
    except OSError as e:
        raise InteropError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InteropError(f"{path}: bad safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise InteropError(f"{path}: bad safetensors header (not a JSON object)")
    entries, data_size = {}, size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)) and begin <= end
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise InteropError(f"{path}: bad safetensors header entry for {name!r}: {info!r}")
        if code not in DTYPES:
            raise InteropError(f"{path}: tensor {name!r} has a dtype this reader does not know: {code!r}")
        nbytes = math.prod(shape) * DTYPES[code].itemsize
        if end - begin != nbytes:
            raise InteropError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} {code}")
        if end > data_size:
            raise InteropError(f"{path} is truncated: tensor {name!r} ends at byte {8 + n + end} of {size}")
        entries[name] = _Entry(path, code, shape, 8 + n + begin, nbytes)
    return entries


class SafetensorsDir:
    """The tensors of a checkpoint directory: the files of model.safetensors.index.json's weight_map when
    there is one (only the names it lists), else every *.safetensors file."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        self._entries: dict[str, _Entry] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InteropError(f"{index}: bad index ({e!r})") from None
            headers = {f: _read_header(self.directory / f) for f in sorted(set(weight_map.values()))}
            for name, file in weight_map.items():
                if name not in headers[file]:
                    raise InteropError(f"{self.directory / file}: has no tensor {name!r}, which {INDEX_NAME} "
                                       f"places there")
                self._entries[name] = headers[file][name]
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise InteropError(f"no *.safetensors files in {self.directory}")
            for path in files:
                for name, entry in _read_header(path).items():
                    if name in self._entries:
                        raise InteropError(f"tensor {name!r} is in both {self._entries[name].path} and {path}")
                    self._entries[name] = entry
        self._names = sorted(self._entries)

    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise InteropError(f"no tensor {name!r} in {self.directory}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        """The safetensors dtype code: "F32", "BF16", "F8_E4M3", "I32", ..."""
        return self._entry(name).dtype

    def nbytes(self, name: str) -> int:
        return self._entry(name).nbytes

    def read(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (BF16 / F8_E4M3 as ml_dtypes), read from its byte range only."""
        e = self._entry(name)
        out = np.empty(e.shape, DTYPES[e.dtype])
        buf = memoryview(out.reshape(-1).view(np.uint8))
        try:
            with open(e.path, "rb", buffering=0) as f:
                f.seek(e.start)
                done = 0
                while done < e.nbytes:
                    got = f.readinto(buf[done:])
                    if not got:
                        raise InteropError(f"{e.path} is truncated: tensor {name!r} ends at byte "
                                           f"{e.start + e.nbytes}, the file at {e.start + done}")
                    done += got
        except OSError as err:
            raise InteropError(f"{e.path}: cannot read tensor {name!r} ({err.strerror or err})") from None
        return out


def _write_atomically(path: Path, chunks) -> None:
    """Write the byte chunks to `path`.tmp, fsync, rename over `path`: never a partial file at `path`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself
    finally:
        os.close(dir_fd)


def save_file(tensors: Mapping[str, np.ndarray], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (any dtype of DTYPES, bf16 / float8 as ml_dtypes) as one safetensors file, atomically."""
    # written here: safetensors.numpy.save_file refuses float8 arrays and writes in place
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata maps str to str")
    # widest dtypes first, like the reference writer: every tensor starts aligned to its itemsize
    order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    arrays = {name: np.asarray(tensors[name], order="C") for name in order}  # (ascontiguousarray makes 0-d 1-d)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, a in arrays.items():
        if name == "__metadata__" or a.dtype not in _CODES:
            raise ValueError(f"cannot save tensor {name!r} of dtype {a.dtype} as safetensors")
        header[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
    chunks = [len(raw).to_bytes(8, "little"), raw, *(a.reshape(-1).view(np.uint8) for a in arrays.values())]
    _write_atomically(Path(path), chunks)


def save_index(directory: str | Path, weight_map: Mapping[str, str], total_size: int) -> None:
    """Write `directory`/model.safetensors.index.json (tensor name -> file name), atomically."""
    index = {"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))}
    _write_atomically(Path(directory) / INDEX_NAME, [json.dumps(index, indent=2).encode()])
