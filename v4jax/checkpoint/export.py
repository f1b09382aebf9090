"""Our state -> the official release format, streaming tensor by tensor.

The output has the release's tensor names, dtypes (`tid2eid` back to I64) and shapes, its
`config.json`, `model.safetensors.index.json` and shard files. A `ReleaseLayout` says which
tensor goes to which shard, in which order, with which header metadata: the source release's
own layout when the state was converted from one (so the files come back byte for byte), else
`default_layout` (layer groups as `synthetic.shard_of`, names sorted, as `write_safetensors`).

Each shard goes through `safetensors.write_safetensors_streamed` (header from shapes alone,
then each tensor a block of rows at a time): memory stays at one block, whatever the shard size.

Sources of release tensors: `OrbaxSource` reads them back out of a stored state (a "bf16" state
is re-quantised with the release recipe, `numerics.quantize`, one weight at a time),
`StateSource` slices them out of in-memory leaves (a `Model`'s).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path as FsPath
from typing import Protocol

import numpy as np

from v4jax.checkpoint.errors import CheckpointError
from v4jax.checkpoint.names import Path
from v4jax.checkpoint.orbax_io import BF16, Dtype, StateReader, Tensor, row_blocks
from v4jax.checkpoint.safetensors import (
    INDEX_FILE,
    SINGLE_FILE,
    ShardedCheckpoint,
    StreamedTensor,
    numpy_dtype,
    write_index,
    write_safetensors_streamed,
)
from v4jax.checkpoint.synthetic import release_tensor_specs, shard_of
from v4jax.config import ModelConfig, to_dict
from v4jax.numerics.quantize import quantize_fp4_rows, quantize_fp8_blocks

SHARD_BYTES = 4 << 30  # default shard size (the Flash release: 46 shards of ~3.5 GB)
LAYOUT_FILE = "layout.json"


class Source(Protocol):
    """Release tensors in our dtypes (`tid2eid` int32), a block of rows at a time."""

    def rows(self, name: str, a: int, b: int) -> np.ndarray: ...


# --------------------------------------------------------------------------- sources


class StateSource:
    """Release tensors sliced out of in-memory state leaves (a `Model`'s)."""

    def __init__(self, values: Mapping[Path, object], tensors: Mapping[str, Tensor]):
        self.values, self.tensors = values, tensors

    def rows(self, name: str, a: int, b: int) -> np.ndarray:
        t = self.tensors[name]
        return np.asarray(self.values[t.path][(*t.index, slice(a, b))])


class OrbaxSource:
    """Release tensors (our dtypes) read from a stored state (`orbax_io.StateReader`).

    "bf16" states: a quantised weight and its scale are re-quantised together, block of rows
    by block, into one release-format buffer that serves both (memory: that one tensor)."""

    def __init__(self, reader: StateReader, tensors: Mapping[str, Tensor], dtype: Dtype):
        self.reader, self.tensors, self.dtype = reader, tensors, dtype
        self._weight_of = {t.scale_name: t for t in tensors.values() if t.quant}
        self._cache: tuple[str, np.ndarray, np.ndarray] | None = None

    def rows(self, name: str, a: int, b: int) -> np.ndarray:
        t = self.tensors[name]
        if self.dtype is Dtype.BF16 and (t.quant or name in self._weight_of):
            w = t if t.quant else self._weight_of[name]
            q, s = self._requantized(w)
            return (q if t.quant else s)[a:b]
        return self.reader.read(t.path, t.index, a, b)

    def _requantized(self, w: Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] != w.name:
            self._cache = None  # free the previous tensor first
            parts = [
                self._quantize(w, self.reader.read(w.path, w.index, a, b).astype(np.float32))
                for a, b in row_blocks((w.shape[0], bf16_width(w)), BF16.itemsize)
            ]
            self._cache = (w.name, *(np.concatenate(x) for x in zip(*parts, strict=True)))
        return self._cache[1], self._cache[2]

    @staticmethod
    def _quantize(w: Tensor, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return quantize_fp8_blocks(rows) if w.quant == "fp8" else quantize_fp4_rows(rows)


def bf16_width(t: Tensor) -> int:
    """Columns of quantised weight `t` once dequantised (FP4 packs two per byte)."""
    return t.shape[-1] * (2 if t.quant == "fp4" else 1)


# --------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    file: str
    tensors: tuple[str, ...]  # in data order
    metadata: dict[str, str]  # the header's __metadata__


@dataclasses.dataclass(frozen=True)
class ReleaseLayout:
    shards: tuple[ShardLayout, ...]
    config_json: str | None = None  # verbatim config.json; None: `to_dict(cfg)`
    index_json: str | None = None  # verbatim index; None: `write_index` (or no index)


def default_layout(cfg: ModelConfig, tensors: Mapping[str, Tensor]) -> ReleaseLayout:
    """Contiguous layer groups in ~`SHARD_BYTES` shards; embed first, head and MTP last."""
    total = sum(t.nbytes for t in tensors.values())
    n = min(cfg.num_layers, max(1, math.ceil(total / SHARD_BYTES)))
    files = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    groups: list[list[str]] = [[] for _ in files]
    for name in tensors:
        groups[shard_of(name, cfg, n)].append(name)
    pairs = zip(files, groups, strict=True)
    shards = tuple(ShardLayout(f, tuple(sorted(g)), {"format": "pt"}) for f, g in pairs)
    return ReleaseLayout(shards)


def save_layout(folder: str | os.PathLike, layout: ReleaseLayout) -> None:
    """Stores a layout as `layout.json` (+ verbatim config.json / index) in `folder`."""
    folder = FsPath(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = [dataclasses.asdict(s) | {"tensors": list(s.tensors)} for s in layout.shards]
    (folder / LAYOUT_FILE).write_text(json.dumps({"shards": shards}) + "\n", encoding="utf-8")
    if layout.config_json is not None:
        (folder / "config.json").write_text(layout.config_json, encoding="utf-8")
    if layout.index_json is not None:
        (folder / INDEX_FILE).write_text(layout.index_json, encoding="utf-8")


def load_layout(folder: str | os.PathLike, tensors: Mapping[str, Tensor]) -> ReleaseLayout:
    """Reads `save_layout`'s files; the layout must place every tensor exactly once."""
    folder = FsPath(folder)
    try:
        raw = json.loads((folder / LAYOUT_FILE).read_text(encoding="utf-8"))
        shards = tuple(
            ShardLayout(str(s["file"]), tuple(s["tensors"]), dict(s["metadata"]))
            for s in raw["shards"]
        )
        cfg = (folder / "config.json").read_text(encoding="utf-8")
        idx = folder / INDEX_FILE
        index = idx.read_text(encoding="utf-8") if idx.exists() else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: unreadable release layout ({e})") from None
    placed = [n for s in shards for n in s.tensors]
    if sorted(placed) != sorted(tensors):
        extra = sorted(set(placed) - set(tensors)) or sorted(set(tensors) - set(placed))
        raise CheckpointError(f"{folder / LAYOUT_FILE}: tensor {extra[0]!r} placed wrongly")
    return ReleaseLayout(shards, cfg, index)


def found_layout(folder: FsPath, ckpt: ShardedCheckpoint, order: Iterable[str]) -> ReleaseLayout:
    """The layout of release `folder` as found: its shards, each one's tensors in `order` (data
    order) and header metadata, its config.json and index verbatim."""
    by_shard: dict[str, list[str]] = {}
    for n in order:
        by_shard.setdefault(ckpt.shard_of(n), []).append(n)
    shards = tuple(
        ShardLayout(s, tuple(by_shard[s]), ckpt.shard(s).metadata) for s in sorted(by_shard)
    )
    index = folder / INDEX_FILE
    return ReleaseLayout(
        shards,
        (folder / "config.json").read_text(encoding="utf-8"),
        index.read_text(encoding="utf-8") if index.exists() else None,
    )


# --------------------------------------------------------------------------- writing


def _release_pieces(t: Tensor, source: Source) -> Iterator[np.ndarray]:
    for a, b in row_blocks(t.shape, numpy_dtype(t.release_dtype).itemsize):
        piece = source.rows(t.name, a, b)
        yield piece.astype(np.int64) if t.release_dtype == "I64" else piece


def write_release(
    folder: str | os.PathLike,
    cfg: ModelConfig,
    layout: ReleaseLayout,
    tensors: Mapping[str, Tensor],
    source: Source,
    on_bytes: Callable[[int], object] | None = None,
) -> None:
    """Writes the shards, `config.json` and the index of `layout` into `folder`."""
    folder = FsPath(folder)
    for shard in layout.shards:
        entries = [
            StreamedTensor(n, tensors[n].release_dtype, tensors[n].shape, _bind(tensors[n], source))
            for n in shard.tensors
        ]
        write_safetensors_streamed(folder / shard.file, entries, shard.metadata, on_bytes)
    config = layout.config_json or json.dumps(to_dict(cfg), indent=2) + "\n"
    (folder / "config.json").write_text(config, encoding="utf-8")
    if layout.index_json is not None:
        (folder / INDEX_FILE).write_text(layout.index_json, encoding="utf-8")
    elif [s.file for s in layout.shards] != [SINGLE_FILE]:
        wmap = {n: s.file for s in layout.shards for n in s.tensors}
        write_index(folder, wmap, sum(t.nbytes for t in tensors.values()))


def _bind(t: Tensor, source: Source) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: _release_pieces(t, source)


# --------------------------------------------------------------------------- random bytes


def write_random_release(
    cfg: ModelConfig, folder: str | os.PathLike, *, seed: int = 0, shards: int = 1
) -> int:
    """A release-format checkpoint of random bytes (finite bf16 / f32, in-range `tid2eid`,
    no FP8 NaN codes), written streaming: for big synthetic checkpoints (memory tests,
    benchmarks). Not a model anyone should run. Returns the tensor bytes."""
    folder = FsPath(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specs = release_tensor_specs(cfg)
    files = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    groups: list[list[str]] = [[] for _ in files]
    for name in specs:
        groups[shard_of(name, cfg, shards)].append(name)
    for file, names in zip(files, groups, strict=True):
        entries = [
            StreamedTensor(n, *specs[n], _random(n, *specs[n], cfg, seed)) for n in sorted(names)
        ]
        write_safetensors_streamed(folder / file, entries, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    total = sum(math.prod(s) * numpy_dtype(d).itemsize for d, s in specs.values())
    write_index(folder, {n: files[shard_of(n, cfg, shards)] for n in specs}, total)
    return total


def _random(name: str, dtype: str, shape, cfg: ModelConfig, seed: int):
    def pieces() -> Iterator[np.ndarray]:
        dt = numpy_dtype(dtype)
        for a, b in row_blocks(shape, dt.itemsize):
            rng = np.random.default_rng([seed, zlib.crc32(name.encode()), a])
            n = (b - a) * math.prod(shape[1:])
            if dtype == "I64":  # tid2eid: expert ids
                yield rng.integers(0, cfg.num_experts, (b - a, *shape[1:]), dtype=np.int64)
                continue
            u = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8)
            if dtype == "F8_E8M0":  # scales 2^-15 .. 2^0
                u = 0x70 | (u & 0x0F)
            elif dtype == "F8_E4M3":  # exponent <= 7: never the NaN code
                u &= 0xBF
            elif dtype in ("BF16", "F32"):  # clear the exponent's top bit: finite, |x| < 2
                u.reshape(-1, dt.itemsize)[:, -1] &= 0xBF
            yield u.view(dt).reshape(b - a, *shape[1:])

    return pieces
