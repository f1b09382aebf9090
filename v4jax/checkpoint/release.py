"""Reading the official release (safetensors shards): into our parameter state, or a block of
rows at a time for conversion.

Every tensor is checked against the slot it fills: unknown names, missing names, wrong shapes
and wrong dtypes are collected and reported together, each by name with expected vs found;
bf16 / f32 tensors are checked for NaN / Inf. Tensors stay in their release formats (FP8 e4m3
and E8M0 scales, packed FP4 as int8); only `tid2eid` changes dtype (int64 -> int32, range
checked).

`load_release_arrays` fills whole leaves (loading a model). `ReleaseSource` serves conversion
(`convert.hf_to_orbax`): the same checks from the headers alone before anything is written,
then rows read with `pread` in file order, the data checks made block by block.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path as FsPath
from typing import TYPE_CHECKING

import jax
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from v4jax.checkpoint.errors import CheckpointError
from v4jax.checkpoint.names import Path, layer_slots, locate
from v4jax.checkpoint.safetensors import ShardedCheckpoint, TensorInfo, dtype_name
from v4jax.checkpoint.synthetic import release_tensor_specs
from v4jax.config import ModelConfig

if TYPE_CHECKING:
    from v4jax.checkpoint.orbax_io import Tensor

__all__ = [
    "MappingSource",
    "ReleaseSource",
    "check_names",
    "load_release_arrays",
    "raise_problems",
    "release_dtype",
]

_INT_SOURCES = {"int32": "I64"}  # our int32 tid2eid is int64 on disk


def release_dtype(ours: np.dtype) -> str:
    d = np.dtype(ours)
    return _INT_SOURCES.get(d.name, dtype_name(d))


class MappingSource:
    """An in-memory {release name: array} dict with the reader interface of a checkpoint."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._t = tensors

    def keys(self) -> list[str]:
        return list(self._t)

    def info(self, name: str) -> TensorInfo:
        a = self._t[name]
        return TensorInfo(dtype_name(a.dtype), tuple(a.shape), a.nbytes)

    def get(self, name: str) -> np.ndarray:
        return self._t[name]

    def __enter__(self) -> MappingSource:
        return self

    def __exit__(self, *exc) -> None:
        return None


def load_release_arrays(
    folder: str | os.PathLike | Mapping[str, np.ndarray],
    cfg: ModelConfig,
    leaves: dict[Path, jax.ShapeDtypeStruct],
    *,
    progress: bool = False,
) -> dict[Path, np.ndarray]:
    """Fills every leaf (path -> abstract shape/dtype) from the release folder."""
    opened = MappingSource(folder) if isinstance(folder, Mapping) else ShardedCheckpoint(folder)
    where = "<in-memory tensors>" if isinstance(folder, Mapping) else folder
    with opened as ckpt:
        names = list(ckpt.keys())
        check_names(names, cfg)
        slots = layer_slots(cfg)
        out = {p: np.empty(a.shape, a.dtype) for p, a in leaves.items()}
        problems: list[str] = []
        for name in tqdm(names, desc="loading", unit="tensor", disable=not progress):
            path, idx = locate(name, cfg, slots)
            if path not in out:
                problems.append(f"{name}: maps to {'.'.join(map(str, path))}, not a parameter")
                continue
            arr = _read(ckpt, name, out[path].dtype, out[path].shape[len(idx) :], problems)
            if (
                arr is not None
                and name.endswith("tid2eid")
                and arr.size
                and (arr.min() < 0 or arr.max() >= cfg.num_experts)
            ):
                problems.append(f"{name}: expert ids outside [0, {cfg.num_experts})")
            elif arr is not None:
                out[path][idx] = arr
        raise_problems(problems, where)
    return out


def check_names(names: Iterable[str], cfg: ModelConfig) -> None:
    """Refuses (all problems in one `CheckpointError`) a missing or unexpected tensor name."""
    expected = release_tensor_specs(cfg)
    present = set(names)
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    msgs = [
        f"missing tensor {n} (expected {expected[n][0]} {list(expected[n][1])})" for n in missing
    ]
    msgs += [
        f"unexpected tensor {n} (not part of this config's release layout)" for n in unexpected
    ]
    raise_problems(msgs, None)


def _header_problem(name: str, info: TensorInfo, dtype: str, shape) -> str | None:
    """The dtype / shape message, from the header alone."""
    if info.dtype != dtype or tuple(info.shape) != tuple(shape):
        return f"{name}: expected {dtype} {list(shape)}, found {info.dtype} {list(info.shape)}"
    return None


def _read(
    ckpt, name: str, dtype: np.dtype, shape: tuple[int, ...], problems: list[str]
) -> np.ndarray | None:
    want = release_dtype(dtype)
    if problem := _header_problem(name, ckpt.info(name), want, shape):
        problems.append(problem)
        return None
    arr = ckpt.get(name)
    if arr.dtype in (np.float32, ml_dtypes.bfloat16) and not _finite(arr):
        problems.append(f"{name}: contains NaN or Inf")
        return None
    if want == "I64":
        if arr.size and (arr.min() < 0 or arr.max() >= np.iinfo(np.int32).max):
            problems.append(f"{name}: values outside int32 range")
            return None
        arr = arr.astype(np.int32)
    return arr


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


def raise_problems(problems: list[str], folder) -> None:
    """Raises one `CheckpointError` listing every problem (nothing if there is none)."""
    if not problems:
        return
    where = f"{os.fspath(folder)}: " if folder is not None else ""
    head = f"{where}{len(problems)} problem(s) with the checkpoint:\n  "
    raise CheckpointError(head + "\n  ".join(problems))


class ReleaseSource:
    """A validated release folder, read a block of rows at a time with `pread` (no memory map
    touched, so nothing accumulates in resident memory), in file order."""

    def __init__(self, folder: FsPath, cfg: ModelConfig, tensors: Mapping[str, Tensor]):
        self.folder, self.cfg, self.tensors = folder, cfg, tensors
        self.ckpt = ShardedCheckpoint(folder)  # index, shard files, headers vs index
        try:
            self.ckpt.validate()
            names = self.ckpt.keys()
            check_names(names, cfg)
            problems = [
                _header_problem(n, self.ckpt.info(n), tensors[n].release_dtype, tensors[n].shape)
                for n in names
            ]
            raise_problems([p for p in problems if p], folder)
        except BaseException:
            self.ckpt.close()
            raise
        # File order (shard, then offset): sequential reads, and each shard's data order.
        where = {n: self.ckpt.shard_of(n) for n in names}
        self.order = sorted(names, key=lambda n: (where[n], self.ckpt.shard(where[n]).offset(n)))

    def rows(self, name: str, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of tensor `name`, data-checked, in our dtype (`tid2eid` int32)."""
        t, arr = self.tensors[name], self.ckpt.read_rows(name, a, b)
        if t.release_dtype in ("BF16", "F32") and not _finite(arr):
            raise_problems([f"{t.name}: contains NaN or Inf"], self.folder)
        if t.release_dtype == "I64":
            if arr.size and (arr.min() < 0 or arr.max() >= self.cfg.num_experts):
                raise_problems(
                    [f"{t.name}: expert ids outside [0, {self.cfg.num_experts})"], self.folder
                )
            arr = arr.astype(np.int32)
        return arr

    def close(self) -> None:
        self.ckpt.close()

    def __enter__(self) -> ReleaseSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
