"""Checkpoint conversion, official release <-> v4jax Orbax (the library behind
scripts/convert.py, `Model.save`, `v4jax.export_hf` and loading an Orbax checkpoint).

`hf_to_orbax` / `orbax_to_hf` convert folders; `save_state` / `export_state` write a model's
in-memory state; `restore_state` reads a v4jax Orbax checkpoint back (optionally straight onto
per-leaf shardings).

Streaming: tensors move a block of rows at a time (`orbax_io.row_blocks`, <= 16 MiB), read
from the shards with `pread` (`release.ReleaseSource`: no memory map, so nothing accumulates in
resident memory) in file order, so host memory stays near one block plus one OCDBT
transaction, whatever the model size.

Safety: the source is validated from its headers before anything is written (index, shard
headers, every tensor's name, dtype and shape against the config: the loader's own checks and
messages); data checks (NaN / Inf in bf16 / f32 tensors, `tid2eid` range) run while streaming.
The output goes to a temporary directory next to DST, fsync'd and renamed onto DST only when
complete; on any error or interruption it is removed (and a DST being overwritten is kept). An
existing DST is replaced only with `overwrite`. Every bad input raises `CheckpointError` naming
the file / tensor.

A process killed outright (SIGKILL, out of memory, power loss) runs no cleanup, so temporary
directories carry their owner in their name, `.DST.v4jax-tmp.HOST.PID.RANDOM`: the next
conversion into the same parent removes those of this host whose process is gone, with a log
line (`_remove_stale`). One that holds the previous DST of an interrupted overwrite (`v4jax-old`)
while DST is missing is only reported, never removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path as FsPath

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from v4jax.checkpoint.errors import CheckpointError
from v4jax.checkpoint.export import (
    OrbaxSource,
    StateSource,
    default_layout,
    found_layout,
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
from v4jax.checkpoint.release import ReleaseSource
from v4jax.config import ConfigError, ModelConfig, from_json
from v4jax.numerics.quantize import dequantize_fp4, dequantize_fp8_blocks

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
    _remove_stale(dst.parent)
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


_log = logging.getLogger(__name__)
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "-"
_STAGING = re.compile(
    r"\.(?P<dst>.+)\.v4jax-(?P<what>tmp|old)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}"
)


def _fresh_dir(dst: FsPath, what: str) -> FsPath:
    """A new hidden directory beside `dst` named after its owner, this host and process
    (default permissions, unlike `mkdtemp`'s 0700)."""
    while True:
        token = secrets.token_hex(4)
        path = dst.parent / f".{dst.name}.v4jax-{what}.{_HOST}.{os.getpid()}.{token}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _remove_stale(parent: FsPath) -> None:
    """Removes the temporary directories in `parent` left by killed conversions: this host's,
    whose process no longer runs (another host's PID means nothing here; a reused PID only
    keeps a directory). An `old` one whose DST is missing holds the only copy of the previous
    output: reported, not removed."""
    for path in parent.iterdir():
        m = _STAGING.fullmatch(path.name)
        if not m or m["host"] != _HOST or _alive(int(m["pid"])) or not _plain_dir(path):
            continue
        if m["what"] == "old" and not (parent / m["dst"]).exists():
            _log.warning(
                "%s: left by killed conversion process %s, holds the previous %s, which is "
                "missing: not removed (move %s back to %s)",
                *(path, m["pid"], m["dst"], path / "x", parent / m["dst"]),
            )
            continue
        shutil.rmtree(path, ignore_errors=True)
        _log.warning(
            "removed %s, left by conversion process %s (no longer running)", path, m["pid"]
        )


def _plain_dir(path: FsPath) -> bool:
    return path.is_dir() and not path.is_symlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
            save_layout(tmp / RELEASE, found_layout(src, source.ckpt, source.order))
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
