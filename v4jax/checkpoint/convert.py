"""Checkpoint conversion, official release <-> v4jax Orbax (the library behind
scripts/convert.py, `Model.save`, `v4jax.export_hf` and loading an Orbax checkpoint).

`hf_to_orbax` / `orbax_to_hf` convert folders; `save_state` / `export_state` write a model's
in-memory state; `restore_state` reads a v4jax Orbax checkpoint back (optionally straight onto
per-leaf shardings).

Streaming: tensors move a block of rows at a time (`orbax_io.row_blocks`, <= 16 MiB), read
from the shards with `pread` (no memory map, so nothing accumulates in resident memory) in file
order, so host memory stays near one block plus one OCDBT transaction, whatever the model size.

Safety: the source is validated from its headers before anything is written (index, shard
headers, every tensor's name, dtype and shape against the config: the loader's own checks and
messages); data checks (NaN / Inf in bf16 / f32 tensors, `tid2eid` range) run while streaming.
The output goes to a temporary directory next to DST, fsync'd and renamed onto DST only when
complete; on any error or interruption it is removed (and a DST being overwritten is kept). An
existing DST is replaced only with `overwrite`. Every bad input raises `CheckpointError` naming
the file / tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path as FsPath

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from v4jax.checkpoint.errors import CheckpointError
from v4jax.checkpoint.export import (
    OrbaxSource,
    ReleaseLayout,
    ShardLayout,
    default_layout,
    load_layout,
    save_layout,
    write_release,
)
from v4jax.checkpoint.names import Path
from v4jax.checkpoint.orbax_io import (
    BF16,
    MARKER,
    RELEASE,
    STATE,
    Dtype,
    Kind,
    Marker,
    StateReader,
    StateWriter,
    Tensor,
    orbax_restore,
    placed,
    read_marker,
    release_tensors,
    require,
    row_blocks,
    scale_names,
    stack_depth,
    stored_leaves,
)
from v4jax.checkpoint.release import _check_names, _raise
from v4jax.checkpoint.safetensors import (
    INDEX_FILE,
    SafetensorsFile,
    ShardedCheckpoint,
    numpy_dtype,
)
from v4jax.checkpoint.synthetic import dequantize_fp4, dequantize_fp8_blocks
from v4jax.config import ConfigError, ModelConfig, from_json

__all__ = [
    "Conversion",
    "export_state",
    "hf_to_orbax",
    "orbax_to_hf",
    "restore_state",
    "save_state",
]


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What a conversion did: `nbytes` of release tensors moved in `seconds`."""

    src: str
    dst: str
    dtype: str
    tensors: int
    nbytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 1e6 / max(self.seconds, 1e-9)


def state_leaves(cfg: ModelConfig) -> dict[Path, jax.ShapeDtypeStruct]:
    """Abstract leaves (shape, dtype) of the parameter state for `cfg` (no allocation)."""
    from v4jax.model.transformer import Transformer
    from v4jax.numerics import Numerics, Precision

    prec = Precision(Numerics.REFERENCE, jnp.bfloat16)
    _, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, prec, "reference")))
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(abstract)}


# --------------------------------------------------------------------------- the release side


class ReleaseSource:
    """A validated release folder, read a block of rows at a time with `pread`."""

    def __init__(self, folder: FsPath, cfg: ModelConfig, tensors: Mapping[str, Tensor]):
        self.folder, self.cfg, self.tensors = folder, cfg, tensors
        with ShardedCheckpoint(folder) as ckpt:  # index, shard files, headers vs index
            ckpt.validate()
            _check_names(ckpt.keys(), cfg)
            problems = [_header_problem(ckpt.info(n), tensors[n]) for n in ckpt.keys()]
            _raise([p for p in problems if p], folder)
            shards = sorted({ckpt.shard_of(n) for n in ckpt.keys()})
        self._files = {s: SafetensorsFile(folder / s) for s in shards}
        self._where: dict[str, tuple[str, int]] = {}
        for s, f in self._files.items():
            for n in f.keys():
                self._where[n] = (s, _file_offset(f.get(n)))
        self._fds: dict[str, int] = {}
        # File order (shard, then offset): sequential reads, and each shard's data order.
        self.order = sorted(self._where, key=self._where.__getitem__)

    def layout(self) -> ReleaseLayout:
        """The shards as found: file names, tensors in data order, header metadata."""
        by_shard: dict[str, list[str]] = {s: [] for s in self._files}
        for n in self.order:
            by_shard[self._where[n][0]].append(n)
        shards = tuple(
            ShardLayout(s, tuple(by_shard[s]), f.metadata) for s, f in self._files.items()
        )
        index = self.folder / INDEX_FILE
        return ReleaseLayout(
            shards,
            (self.folder / "config.json").read_text(encoding="utf-8"),
            index.read_text(encoding="utf-8") if index.exists() else None,
        )

    def rows(self, name: str, a: int, b: int) -> np.ndarray:
        t = self.tensors[name]
        shard, offset = self._where[name]
        out = np.empty((b - a, *t.shape[1:]), numpy_dtype(t.release_dtype))
        row = out[:1].nbytes if out.size else 0
        if shard not in self._fds:
            self._fds[shard] = os.open(self.folder / shard, os.O_RDONLY)
        got = os.preadv(self._fds[shard], [out.reshape(-1).view(np.uint8)], offset + a * row)
        if got != out.nbytes:
            raise CheckpointError(f"{self.folder / shard}: truncated while reading {name!r}")
        return self._checked(t, out)

    def _checked(self, t: Tensor, arr: np.ndarray) -> np.ndarray:
        if t.release_dtype in ("BF16", "F32") and not _finite(arr):
            _raise([f"{t.name}: contains NaN or Inf"], self.folder)
        if t.release_dtype == "I64":
            if arr.size and (arr.min() < 0 or arr.max() >= self.cfg.num_experts):
                _raise([f"{t.name}: expert ids outside [0, {self.cfg.num_experts})"], self.folder)
            arr = arr.astype(np.int32)
        return arr

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for f in self._files.values():
            f.close()

    def __enter__(self) -> ReleaseSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _header_problem(info, t: Tensor) -> str | None:
    """The loader's dtype / shape message (release.py `_read`), from the header alone."""
    if info.dtype != t.release_dtype or tuple(info.shape) != tuple(t.shape):
        want, found = f"{t.release_dtype} {list(t.shape)}", f"{info.dtype} {list(info.shape)}"
        return f"{t.name}: expected {want}, found {found}"
    return None


def _file_offset(view: np.ndarray) -> int:
    """File offset of a `SafetensorsFile.get` view (a view of the file's memory map)."""
    mm = view.base
    if not isinstance(mm, np.memmap):
        raise CheckpointError("internal: safetensors view is not backed by a memory map")
    return view.ctypes.data - mm.ctypes.data + mm.offset


def _finite(arr: np.ndarray) -> bool:
    """No NaN / Inf. bf16 without a float32 copy: setting every bit but the exponent's turns
    exactly the NaN / Inf codes (all-ones exponent) into 0xFFFF (64K at a time, one buffer)."""
    if arr.dtype != ml_dtypes.bfloat16:
        return bool(np.isfinite(arr).all())
    u = arr.reshape(-1).view(np.uint16)
    buf = np.empty(max(1, min(u.size, 1 << 16)), np.uint16)
    for i in range(0, u.size, buf.size):
        part = np.bitwise_or(u[i : i + buf.size], 0x807F, out=buf[: min(buf.size, u.size - i)])
        if part.max() == 0xFFFF:
            return False
    return True


class StateSource:
    """Release tensors sliced out of in-memory state leaves (a `Model`'s)."""

    def __init__(self, values: Mapping[Path, object], tensors: Mapping[str, Tensor]):
        self.values, self.tensors = values, tensors

    def rows(self, name: str, a: int, b: int) -> np.ndarray:
        t = self.tensors[name]
        return np.asarray(self.values[t.path][(*t.index, slice(a, b))])


# --------------------------------------------------------------------------- pipelines


def dequantized(t: Tensor, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Rows of quantised weight `t` + their scale rows -> bf16 [rows, I], checked exact."""
    f = dequantize_fp8_blocks(w, s) if t.quant == "fp8" else dequantize_fp4(w, s)
    out = f.astype(BF16)
    if not np.array_equal(out.astype(np.float32), f):
        raise CheckpointError(f"{t.name}: dequantised values are not exactly representable in bf16")
    return out


def scale_rows(t: Tensor, a: int, b: int) -> tuple[int, int]:
    """Rows of `t`'s scale tensor covering weight rows [a, b) (a multiple of 128)."""
    return (a // 128, -(-b // 128)) if t.quant == "fp8" else (a, b)


def write_state(
    folder: FsPath,
    leaves: Mapping[Path, jax.ShapeDtypeStruct],
    tensors: Mapping[str, Tensor],
    source,
    dtype: Dtype,
    order: list[str],
    bar: tqdm,
) -> None:
    """Streams every release tensor of `source` into an Orbax state at `folder`."""
    writer = StateWriter(folder, stored_leaves(leaves, tensors, dtype), stack_depth(tensors))
    skip = scale_names(tensors) if dtype is Dtype.BF16 else set()
    try:
        for name in order:
            t = tensors[name]
            if name in skip:  # folded into its weight
                bar.update(t.nbytes)
                continue
            for a, b in writer.blocks(t.path):
                piece = source.rows(name, a, b)
                if t.quant and dtype is Dtype.BF16:
                    scale = source.rows(t.scale_name, *scale_rows(t, a, b))
                    piece = dequantized(t, piece, scale)
                writer.write(t.path, t.index, a, piece)
                bar.update(t.nbytes * (b - a) // t.shape[0])
    except BaseException:
        writer.abort()
        raise
    writer.close()


@contextlib.contextmanager
def staged(dst: FsPath, overwrite: bool) -> Iterator[FsPath]:
    """A temporary directory next to `dst`, renamed onto it on success, removed on failure."""
    _check_dst(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(dst, "tmp")
    try:
        yield tmp
        _sync_tree(tmp)
        if dst.exists() or dst.is_symlink():
            _check_dst(dst, overwrite)
            old = _fresh_dir(dst, "old")
            os.replace(dst, old / "x")
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.replace(old / "x", dst)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fresh_dir(dst: FsPath, what: str) -> FsPath:
    """A new hidden directory beside `dst` (default permissions, unlike `mkdtemp`'s 0700)."""
    while True:
        path = dst.parent / f".{dst.name}.{what}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _sync_tree(folder: FsPath) -> None:
    """fsync every file and directory under `folder` (data is written without per-commit
    syncs), so that the renamed result is complete on disk, not just in the page cache."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_dst(dst: FsPath, overwrite: bool) -> None:
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise CheckpointError(f"{dst}: already exists (overwrite=True / --overwrite replaces it)")


def _paths(src, dst, overwrite: bool) -> tuple[FsPath, FsPath]:
    src, dst = FsPath(src).absolute(), FsPath(dst).absolute()
    rs, rd = src.resolve(), dst.resolve()
    if rs == rd or rs in rd.parents or rd in rs.parents:
        raise CheckpointError(f"{dst}: must not be, contain or lie inside the source {src}")
    _check_dst(dst, overwrite)
    return src, dst


def _bar(progress: bool, total: int, desc: str) -> tqdm:
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, disable=not progress
    )


def _config(folder: FsPath) -> ModelConfig:
    try:
        return from_json(folder)
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None


# --------------------------------------------------------------------------- public


def restore_state(
    folder: str | os.PathLike,
    leaves: Mapping[Path, jax.ShapeDtypeStruct],
    *,
    shardings: Mapping[Path, jax.sharding.Sharding] | None = None,
) -> dict[Path, jax.Array]:
    """Every leaf of the state (release formats) from v4jax Orbax checkpoint `folder`.

    `shardings` (leaf path -> sharding, default: the first device) places each leaf: "keep"
    checkpoints through Orbax's restore (each host reads only its shards), "bf16" ones after
    re-quantising on the host."""
    folder, shardings = FsPath(folder), dict(shardings or {})
    marker = read_marker(folder)
    tensors = release_tensors(marker.config, leaves)
    reader = StateReader(folder / STATE)
    reader.check(stored_leaves(leaves, tensors, marker.dtype))
    if marker.dtype is Dtype.KEEP:
        return orbax_restore(reader.folder, leaves, shardings)
    out = {p: np.empty(a.shape, a.dtype) for p, a in leaves.items()}
    source = OrbaxSource(reader, tensors, marker.dtype)
    for t in tensors.values():
        for a, b in row_blocks(t.shape, np.dtype(t.dtype).itemsize):
            out[t.path][(*t.index, slice(a, b))] = source.rows(t.name, a, b)
    return {p: placed(out.pop(p), shardings.get(p)) for p in list(out)}


def hf_to_orbax(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str = "keep",
    overwrite: bool = False,
    progress: bool = False,
) -> Conversion:
    """Official release folder `src` -> v4jax Orbax checkpoint `dst` (see `orbax_io`)."""
    mode = Dtype.parse(dtype)
    src, dst = _paths(src, dst, overwrite)
    require(src, Kind.RELEASE)
    cfg = _config(src)
    leaves = state_leaves(cfg)
    tensors = release_tensors(cfg, leaves)
    total, t0 = sum(t.nbytes for t in tensors.values()), time.perf_counter()
    with ReleaseSource(src, cfg, tensors) as source, _bar(progress, total, "hf-to-orbax") as bar:
        with staged(dst, overwrite) as tmp:
            write_state(tmp / STATE, leaves, tensors, source, mode, source.order, bar)
            save_layout(tmp / RELEASE, source.layout())
            (tmp / MARKER).write_text(Marker(cfg, mode, release=True).to_json())
    return Conversion(str(src), str(dst), str(mode), len(tensors), total, time.perf_counter() - t0)


def orbax_to_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Conversion:
    """v4jax Orbax checkpoint `src` -> official release format at `dst` (see `export`)."""
    src, dst = _paths(src, dst, overwrite)
    require(src, Kind.ORBAX)
    marker = read_marker(src)
    leaves = state_leaves(marker.config)
    tensors = release_tensors(marker.config, leaves)
    reader = StateReader(src / STATE)
    reader.check(stored_leaves(leaves, tensors, marker.dtype))
    layout = (
        load_layout(src / RELEASE, tensors)
        if marker.release
        else default_layout(marker.config, tensors)
    )
    source = OrbaxSource(reader, tensors, marker.dtype)
    total, t0 = sum(t.nbytes for t in tensors.values()), time.perf_counter()
    with _bar(progress, total, "orbax-to-hf") as bar, staged(dst, overwrite) as tmp:
        write_release(tmp, marker.config, layout, tensors, source, bar.update)
    seconds = time.perf_counter() - t0
    return Conversion(str(src), str(dst), str(marker.dtype), len(tensors), total, seconds)


def save_state(
    cfg: ModelConfig,
    values: Mapping[Path, object],
    dst: str | os.PathLike,
    *,
    dtype: str = "keep",
    overwrite: bool = False,
) -> None:
    """In-memory state leaves (a `Model`'s) -> v4jax Orbax checkpoint `dst`."""
    mode, dst = Dtype.parse(dtype), FsPath(dst).absolute()
    _check_dst(dst, overwrite)
    leaves = {p: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for p, v in values.items()}
    tensors = release_tensors(cfg, leaves)
    source = StateSource(values, tensors)
    with _bar(False, 0, "save") as bar, staged(dst, overwrite) as tmp:
        write_state(tmp / STATE, leaves, tensors, source, mode, list(tensors), bar)
        (tmp / MARKER).write_text(Marker(cfg, mode, release=False).to_json())


def export_state(
    cfg: ModelConfig, values: Mapping[Path, object], dst: str | os.PathLike, *, overwrite=False
) -> None:
    """In-memory state leaves (a `Model`'s) -> official release format at `dst`."""
    dst = FsPath(dst).absolute()
    _check_dst(dst, overwrite)
    leaves = {p: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for p, v in values.items()}
    tensors = release_tensors(cfg, leaves)
    with staged(dst, overwrite) as tmp:
        write_release(tmp, cfg, default_layout(cfg, tensors), tensors, StateSource(values, tensors))
