"""Torch-free reader and writer for safetensors files and sharded checkpoints.

A safetensors file is laid out as::

    [8 bytes]  N, the header length, unsigned 64-bit little-endian
    [N bytes]  UTF-8 JSON header (padded with spaces):
               {"<name>": {"dtype": "F8_E4M3", "shape": [128, 256],
                           "data_offsets": [begin, end]},
                ...,
                "__metadata__": {"<key>": "<str value>"}}      (optional)
    [rest]     the data buffer; ``begin``/``end`` are byte offsets into it

Every tensor is stored C-contiguous, little-endian, and occupies exactly
``prod(shape) * itemsize`` bytes. The DeepSeek-V4 release uses F8_E4M3 weights with
F8_E8M0 block scales, BF16/F32 for the small tensors, I64 for the hash-routing
tables, and stores its packed FP4 experts as I8 (two e2m1 codes per byte), which
this module returns unchanged as ``int8``.

A sharded checkpoint is a folder holding ``model.safetensors.index.json``
(``{"metadata": {...}, "weight_map": {name: shard_file}}``) and the shards, or a
single ``model.safetensors``. Every problem raises :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self

import ml_dtypes
import numpy as np

from v4jax.checkpoint.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100_000_000  # same limit as the reference (Rust) implementation

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
_NAMES: dict[np.dtype, str] = {dt: name for name, dt in _DTYPES.items()}


class TensorInfo(NamedTuple):
    """What the header says about one tensor."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def numpy_dtype(name: str) -> np.dtype:
    """The numpy (or ml_dtypes) dtype of a safetensors dtype string such as ``"BF16"``."""
    if name not in _DTYPES:
        raise CheckpointError(f"unknown safetensors dtype {name!r}")
    return _DTYPES[name]


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors dtype string of a numpy (or ml_dtypes) dtype."""
    dt = np.dtype(dtype).newbyteorder("<")
    if dt not in _NAMES:
        raise CheckpointError(f"dtype {np.dtype(dtype)} has no safetensors equivalent")
    return _NAMES[dt]


# --------------------------------------------------------------------------- reading


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_str_map(x: object) -> bool:
    return isinstance(x, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in x.items()
    )


def _read_header(path: Path, file_size: int) -> tuple[dict, int]:
    """Returns the decoded JSON header and the file offset of the data buffer."""
    if file_size < 8:
        raise CheckpointError(f"{path}: truncated: {file_size} bytes, not even a header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(file_size - 8, _MAX_HEADER):
            limit = f"the file size {file_size}" if n > file_size - 8 else f"{_MAX_HEADER}"
            raise CheckpointError(f"{path}: corrupted header: header length {n} exceeds {limit}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted header: invalid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted header: JSON is not an object")
    return header, 8 + n


def _parse_metadata(path: Path, meta: object) -> dict[str, str]:
    if meta is None:
        return {}
    if not _is_str_map(meta):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    return dict(meta)


def _parse_entry(path: Path, name: str, raw: object, data_size: int) -> tuple[TensorInfo, int]:
    """Validates one header entry against the data buffer of ``data_size`` bytes."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(raw, dict) or not {"dtype", "shape", "data_offsets"} <= raw.keys():
        raise CheckpointError(f"{where}: entry needs 'dtype', 'shape' and 'data_offsets'")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if dtype not in _DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
    if end < begin or end - begin != nbytes:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] inconsistent with "
            f"{dtype} {shape} ({nbytes} bytes)"
        )
    if end > data_size:
        raise CheckpointError(
            f"{where}: file is truncated: tensor needs data bytes [{begin}, {end}) "
            f"but the data buffer holds only {data_size} bytes"
        )
    return TensorInfo(dtype, tuple(shape), nbytes), begin  # begin: offset in the data


class _TensorStore:
    """Name lookup, iteration and context management shared by the two readers."""

    _names: Mapping[str, object]

    def keys(self) -> list[str]:
        """Tensor names, in header (file) or index (folder) order."""
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class SafetensorsFile(_TensorStore):
    """One safetensors file, header validated on open, tensors memory-mapped read-only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path, self._fd = Path(path), None
        try:
            file_size = self.path.stat().st_size
            header, self._data_start = _read_header(self.path, file_size)
            self._mm: np.memmap | None = np.memmap(self.path, dtype=np.uint8, mode="r")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror})") from None
        data_size = file_size - self._data_start
        self.metadata: dict[str, str] = _parse_metadata(self.path, header.pop("__metadata__", None))
        self._names: dict[str, tuple[TensorInfo, int]] = {
            name: _parse_entry(self.path, name, raw, data_size) for name, raw in header.items()
        }

    def _entry(self, name: str) -> tuple[TensorInfo, int]:
        if name not in self._names:
            raise CheckpointError(f"{self.path}: tensor {name!r} not in this file")
        return self._names[name]

    def info(self, name: str) -> TensorInfo:
        """dtype string, shape and byte size of ``name``, from the header alone."""
        return self._entry(name)[0]

    def get(self, name: str) -> np.ndarray:
        """A read-only zero-copy view of ``name`` into the memory map.

        The view keeps the mapping alive, so it stays valid after :meth:`close`.
        """
        info, offset = self.info(name), self.offset(name)
        if self._mm is None:
            raise CheckpointError(f"{self.path}: tensor {name!r}: file is closed")
        return np.ndarray(info.shape, dtype=_DTYPES[info.dtype], buffer=self._mm, offset=offset)

    def offset(self, name: str) -> int:
        """File offset of the first byte of ``name``'s data."""
        return self._data_start + self._entry(name)[1]

    def read_rows(self, name: str, a: int, b: int) -> np.ndarray:
        """A copy of rows [a, b) of ``name``, read with ``pread``: unlike :meth:`get` nothing
        stays mapped, so streaming a big file does not grow resident memory."""
        info = self.info(name)
        if not info.shape or not 0 <= a <= b <= info.shape[0]:
            raise CheckpointError(f"{self.path}: tensor {name!r}: no rows [{a}, {b})")
        out = np.empty((b - a, *info.shape[1:]), _DTYPES[info.dtype])
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        start = self.offset(name) + a * out.itemsize * math.prod(info.shape[1:])
        if os.preadv(self._fd, [out.reshape(-1).view(np.uint8)], start) != out.nbytes:
            raise CheckpointError(f"{self.path}: truncated while reading {name!r}")
        return out

    def close(self) -> None:
        """Drops this object's reference to the memory map, closes the `pread` handle."""
        self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ShardedCheckpoint(_TensorStore):
    """A checkpoint folder: ``model.safetensors.index.json`` + shards, or ``model.safetensors``.

    Shards are opened on first use; opening one checks that it holds exactly the
    tensors that the index maps to it. :meth:`validate` opens every shard.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._shards: dict[str, SafetensorsFile] = {}
        self.metadata, self._names = self._read_weight_map()
        self._by_shard: dict[str, set[str]] = {}
        for name, shard in self._names.items():
            self._by_shard.setdefault(shard, set()).add(name)
        for shard, names in self._by_shard.items():
            if not (self.folder / shard).is_file():
                raise CheckpointError(
                    f"{self.folder / INDEX_FILE}: shard {shard!r} "
                    f"(holding tensor {min(names)!r}) does not exist"
                )

    def _read_weight_map(self) -> tuple[dict, dict[str, str]]:
        """(metadata, weight_map) from the index, or from a lone ``model.safetensors``."""
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: checkpoint folder does not exist")
        if (self.folder / INDEX_FILE).is_file():
            return _read_index(self.folder / INDEX_FILE)
        if not (self.folder / SINGLE_FILE).is_file():
            raise CheckpointError(f"{self.folder}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        single = self._shards[SINGLE_FILE] = SafetensorsFile(self.folder / SINGLE_FILE)
        return dict(single.metadata), dict.fromkeys(single.keys(), SINGLE_FILE)

    def shard_of(self, name: str) -> str:
        """File name (relative to the folder) of the shard holding ``name``."""
        if name not in self._names:
            raise CheckpointError(f"{self.folder}: tensor {name!r} not in the checkpoint")
        return self._names[name]

    def shard(self, shard: str) -> SafetensorsFile:
        """The shard file ``shard`` (a file name from the index), opened on first use."""
        if shard not in self._by_shard:
            raise CheckpointError(f"{self.folder}: {shard!r} is not a shard of the checkpoint")
        if shard not in self._shards:
            f = SafetensorsFile(self.folder / shard)
            expected = self._by_shard[shard]
            if missing := sorted(expected - set(f.keys())):
                raise CheckpointError(
                    f"{f.path}: tensor {missing[0]!r} is listed in the index "
                    f"but missing from this shard ({len(missing)} missing)"
                )
            if extra := sorted(set(f.keys()) - expected):
                raise CheckpointError(
                    f"{f.path}: tensor {extra[0]!r} is in this shard "
                    f"but not in the index ({len(extra)} such)"
                )
            self._shards[shard] = f
        return self._shards[shard]

    def info(self, name: str) -> TensorInfo:
        """dtype string, shape and byte size of ``name``."""
        return self.shard(self.shard_of(name)).info(name)

    def get(self, name: str) -> np.ndarray:
        """A read-only zero-copy view of ``name`` (see :meth:`SafetensorsFile.get`)."""
        return self.shard(self.shard_of(name)).get(name)

    def read_rows(self, name: str, a: int, b: int) -> np.ndarray:
        """A copy of rows [a, b) of ``name`` (see :meth:`SafetensorsFile.read_rows`)."""
        return self.shard(self.shard_of(name)).read_rows(name, a, b)

    def validate(self) -> None:
        """Opens every shard, checking its header and its agreement with the index."""
        for shard in self._by_shard:
            self.shard(shard)

    def close(self) -> None:
        """Closes every opened shard."""
        for f in self._shards.values():
            f.close()
        self._shards.clear()


def _read_index(path: Path) -> tuple[dict, dict[str, str]]:
    """Returns (metadata, weight_map) of a ``model.safetensors.index.json``."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: malformed index JSON ({e})") from None
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not _is_str_map(wmap):
        raise CheckpointError(f"{path}: malformed index: 'weight_map' must map names to files")
    meta = index.get("metadata") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: malformed index: 'metadata' must be an object")
    return meta, wmap


# --------------------------------------------------------------------------- writing


class StreamedTensor(NamedTuple):
    """A tensor to write piece by piece: its name, safetensors dtype and shape, and a callable
    yielding its data in order as arrays of that dtype, split along the first axis."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: Callable[[], Iterable[np.ndarray]]


def write_safetensors_streamed(
    path: str | os.PathLike[str],
    tensors: Sequence[StreamedTensor],
    metadata: Mapping[str, str] | None = None,
    on_bytes: Callable[[int], object] | None = None,
) -> None:
    """Writes ``tensors`` (in the given order) to ``path`` one piece at a time: the header is
    built from dtypes and shapes alone, so memory stays at one piece whatever the file size.

    The data go to ``<path>.tmp`` first, which is renamed on success and removed on failure.
    ``on_bytes(n)`` is called after each piece (progress bars).
    """
    path = Path(path)
    header = _header(path, tensors, metadata)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for t in tensors:
                _write_pieces(f, path, t, on_bytes)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _header(path: Path, tensors: Sequence[StreamedTensor], metadata) -> bytes:
    """JSON header, space-padded so that the data buffer starts 8-byte aligned."""
    header: dict[str, object] = {}
    if metadata:
        if not _is_str_map(dict(metadata)):
            raise CheckpointError(f"{path}: metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for t in tensors:
        if t.name == "__metadata__" or t.name in header:
            why = "is not a valid tensor name" if t.name == "__metadata__" else "appears twice"
            raise CheckpointError(f"{path}: tensor name {t.name!r} {why}")
        nbytes = math.prod(t.shape) * numpy_dtype(t.dtype).itemsize
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-(8 + len(raw)) % 8)


def _write_pieces(f, path: Path, t: StreamedTensor, on_bytes) -> None:
    """Writes the pieces of ``t``, checking their dtype, trailing shape and total size."""
    dtype, done = numpy_dtype(t.dtype), 0
    want = math.prod(t.shape) * dtype.itemsize
    for piece in t.pieces():
        if piece.dtype != dtype or piece.shape[1:] != tuple(t.shape)[1:]:
            raise CheckpointError(
                f"{path}: tensor {t.name!r}: got {piece.dtype} {list(piece.shape)}, "
                f"expected {t.dtype} {list(t.shape)}"
            )
        f.write(np.ascontiguousarray(piece).reshape(-1).view(np.uint8).data)
        done += piece.nbytes
        if on_bytes is not None:
            on_bytes(piece.nbytes)
    if done != want:
        raise CheckpointError(f"{path}: tensor {t.name!r}: {done} of {want} bytes")


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes in-memory ``tensors`` (in sorted-name order) to ``path``, one array at a time
    (through :func:`write_safetensors_streamed`: same header, same atomic rename)."""
    streamed = []
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        a = a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
        try:
            dtype = dtype_name(a.dtype)
        except CheckpointError as e:
            raise CheckpointError(f"tensor {name!r}: {e}") from None
        streamed.append(StreamedTensor(name, dtype, a.shape, lambda a=a: (a,)))
    write_safetensors_streamed(path, streamed, metadata)


def write_index(
    folder: str | os.PathLike[str], weight_map: Mapping[str, str], total_size: int
) -> None:
    """Writes ``model.safetensors.index.json`` (names sorted) into ``folder``."""
    index = {
        "metadata": {"total_size": int(total_size)},
        "weight_map": {name: weight_map[name] for name in sorted(weight_map)},
    }
    (Path(folder) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
