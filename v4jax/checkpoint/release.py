"""Loading the official release (safetensors shards) into our parameter state.

Every tensor is checked against the slot it fills: unknown names, missing names, wrong shapes
and wrong dtypes are collected and reported together, each by name with expected vs found;
bf16 / f32 tensors are checked for NaN / Inf. Tensors stay in their release formats (FP8 e4m3
and E8M0 scales, packed FP4 as int8); only `tid2eid` changes dtype (int64 -> int32, range
checked).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import jax
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from v4jax.checkpoint.errors import CheckpointError
from v4jax.checkpoint.names import Path, layer_slots, locate
from v4jax.checkpoint.safetensors import ShardedCheckpoint, TensorInfo, dtype_name
from v4jax.checkpoint.synthetic import release_tensor_specs
from v4jax.config import ModelConfig

__all__ = ["MappingSource", "load_release_arrays", "release_dtype"]

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
        _check_names(names, cfg)
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
        _raise(problems, where)
    return out


def _check_names(names: Iterable[str], cfg: ModelConfig) -> None:
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
    _raise(msgs, None)


def _read(
    ckpt, name: str, dtype: np.dtype, shape: tuple[int, ...], problems: list[str]
) -> np.ndarray | None:
    info = ckpt.info(name)
    want = release_dtype(dtype)
    if info.dtype != want or tuple(info.shape) != tuple(shape):
        problems.append(
            f"{name}: expected {want} {list(shape)}, found {info.dtype} {list(info.shape)}"
        )
        return None
    arr = ckpt.get(name)
    if (
        arr.dtype in (np.float32, ml_dtypes.bfloat16)
        and not np.isfinite(arr.astype(np.float32)).all()
    ):
        problems.append(f"{name}: contains NaN or Inf")
        return None
    if want == "I64":
        if arr.size and (arr.min() < 0 or arr.max() >= np.iinfo(np.int32).max):
            problems.append(f"{name}: values outside int32 range")
            return None
        arr = arr.astype(np.int32)
    return arr


def _raise(problems: list[str], folder) -> None:
    if not problems:
        return
    where = f"{os.fspath(folder)}: " if folder is not None else ""
    head = f"{where}{len(problems)} problem(s) with the checkpoint:\n  "
    raise CheckpointError(head + "\n  ".join(problems))
