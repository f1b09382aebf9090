"""The v4jax Orbax checkpoint format: writer, reader, marker, detection, Orbax restore.

A v4jax Orbax checkpoint is a directory::

    DIR/v4jax.json   the marker, written last: format, version, dtype mode, the model config
    DIR/state/       an Orbax PyTree checkpoint (OCDBT + zarr v2, zstd) of the parameter state
                     as a pure dict, one array per leaf named by its path
                     ("segments.0.blocks.1.attn.wq_a.weight", "mtp.block.ffn.experts.w1_scale")
    DIR/release/     when converted from a release: its config.json, index json and shard layout
                     (file names, tensor order, header metadata), so that the export writes the
                     same files back

Dtype modes (`Dtype`): "keep" stores every leaf in its release format (FP8 e4m3 + E8M0 block
scales, packed FP4 int8 + E8M0, bf16 / f32, int32 `tid2eid`), so the checkpoint is about as
large as the release; "bf16" stores each quantised weight dequantised as bf16 [..., O, I] and
drops its scale leaf (exact: e4m3 / e2m1 times a power of two has at most 4 significant bits).
Reading a "bf16" checkpoint back re-quantises with the release recipe (`export.OrbaxSource`):
the values come back exactly, the bytes need not (a scale can come back halved, codes doubled).

Writing streams: each release tensor is written as blocks of rows (`row_blocks`: <=
`PIECE_BYTES`, a multiple of 128 rows), each block one zarr chunk (no read-modify-write), the
blocks batched into OCDBT transactions of about `TXN_BYTES`, committed in the background
without per-commit fsync (`convert.staged` syncs the tree once, before the final rename).
`ocp.StandardCheckpointer().restore(DIR / "state", target)` reads the result like any Orbax
checkpoint, onto any sharding; `orbax_restore` does that for the loader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path as FsPath

import jax
import ml_dtypes
import numpy as np
import tensorstore as ts

from v4jax.checkpoint.errors import CheckpointError
from v4jax.checkpoint.names import Path, layer_slots, locate
from v4jax.checkpoint.release import raise_problems
from v4jax.checkpoint.safetensors import INDEX_FILE, SINGLE_FILE, numpy_dtype
from v4jax.checkpoint.synthetic import release_tensor_specs
from v4jax.config import ConfigError, ModelConfig, from_dict, from_json, to_dict

MARKER, STATE, RELEASE = "v4jax.json", "state", "release"
FORMAT, VERSION = "v4jax.orbax", 1
PIECE_BYTES = 16 << 20  # rows per write / read block: bounds memory, one zarr chunk each
TXN_BYTES = 16 << 20  # bytes per OCDBT commit: tensorstore holds ~3x this while committing
_COMPRESSOR = {"id": "zstd", "level": 1}  # Orbax's default for zarr v2
BF16 = np.dtype(ml_dtypes.bfloat16)


class Dtype(enum.StrEnum):
    """How quantised weights are stored: release formats, or dequantised bf16."""

    KEEP = "keep"
    BF16 = "bf16"

    @classmethod
    def parse(cls, value: str | Dtype) -> Dtype:
        try:
            return cls(value)
        except ValueError:
            raise CheckpointError(f"dtype={value!r}: expected 'keep' or 'bf16'") from None


# --------------------------------------------------------------------------- the tensor map


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One release tensor and the slice of the state it fills."""

    name: str  # release name, e.g. "layers.3.ffn.experts.7.w1.weight"
    path: Path  # state leaf
    index: tuple[int, ...]  # position in the leaf's stacked dims (repeat, expert)
    dtype: np.dtype  # ours (tid2eid: int32)
    shape: tuple[int, ...]  # release shape
    release_dtype: str  # safetensors dtype string (tid2eid: "I64")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * numpy_dtype(self.release_dtype).itemsize

    @property
    def quant(self) -> str | None:
        """The format of a quantised weight ("fp8" / "fp4"), else None."""
        if not self.name.endswith(".weight"):
            return None
        return {"F8_E4M3": "fp8", "I8": "fp4"}.get(self.release_dtype)

    @property
    def scale_name(self) -> str:
        return self.name.removesuffix(".weight") + ".scale"


def release_tensors(cfg: ModelConfig, leaves: Mapping[Path, jax.ShapeDtypeStruct]):
    """{release name: Tensor} for every tensor of `cfg`'s release, in release order."""
    slots, out = layer_slots(cfg), {}
    for name, (dt, shape) in release_tensor_specs(cfg).items():
        path, idx = locate(name, cfg, slots)
        out[name] = Tensor(name, path, idx, np.dtype(leaves[path].dtype), shape, dt)
    return out


def scale_names(tensors: Mapping[str, Tensor]) -> set[str]:
    return {t.scale_name for t in tensors.values() if t.quant}


def stored_leaves(
    leaves: Mapping[Path, jax.ShapeDtypeStruct], tensors: Mapping[str, Tensor], dtype: Dtype
) -> dict[Path, jax.ShapeDtypeStruct]:
    """The leaves as stored: "keep" = the state's; "bf16" = weights [..., O, I], no scales."""
    if dtype is Dtype.KEEP:
        return dict(leaves)
    out = dict(leaves)
    for t in tensors.values():
        if t.quant:
            w = leaves[t.path]
            width = w.shape[-1] * (2 if t.quant == "fp4" else 1)  # FP4: two per byte
            out[t.path] = jax.ShapeDtypeStruct((*w.shape[:-1], width), BF16)
            out.pop(tensors[t.scale_name].path, None)
    return out


def stack_depth(tensors: Mapping[str, Tensor]) -> dict[Path, int]:
    """Leaf -> number of leading stacked dims (repeats, experts) above a release tensor."""
    return {t.path: len(t.index) for t in tensors.values()}


def param_name(path: Path) -> str:
    """Orbax's name of a leaf: its keys joined with dots."""
    return ".".join(map(str, path))


def row_blocks(shape: tuple[int, ...], itemsize: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) of a tensor: `PIECE_BYTES` each, a multiple of 128 rows (FP8 scale
    blocks), at least 128 rows."""
    if not shape:
        raise CheckpointError("0-d tensors are not part of the release layout")
    n, row = shape[0], math.prod(shape[1:]) * itemsize
    rows = max(128, (PIECE_BYTES // max(row, 1)) // 128 * 128)
    return [(a, min(a + rows, n)) for a in range(0, n, rows)] or [(0, 0)]


# --------------------------------------------------------------------------- writing


class StateWriter:
    """Writes the stored leaves block by block into an Orbax PyTree checkpoint at `folder`."""

    def __init__(
        self, folder: str | os.PathLike, stored: Mapping[Path, jax.ShapeDtypeStruct], depth
    ):
        self.folder = FsPath(folder).absolute()
        self.folder.mkdir(parents=True, exist_ok=False)
        self._stored, self._depth = dict(stored), dict(depth)
        self._ctx = ts.Context({"file_io_concurrency": {"limit": 32}, "file_io_sync": False})
        # Created together: concurrent creations share one OCDBT commit.
        futures = {p: ts.open(self._create_spec(p), context=self._ctx) for p in self._stored}
        self._stores = {p: f.result() for p, f in futures.items()}
        self._written: dict[Path, int] = dict.fromkeys(self._stored, 0)
        self._txn, self._pending = ts.Transaction(), 0
        self._committing: ts.Future | None = None  # the previous batch, written meanwhile

    def blocks(self, path: Path) -> list[tuple[int, int]]:
        a = self._stored[path]
        return row_blocks(a.shape[self._depth.get(path, 0) :], np.dtype(a.dtype).itemsize)

    def _create_spec(self, path: Path) -> dict:
        """zarr v2 array of the leaf, one chunk per row block of one stacked slice."""
        a, d = self._stored[path], self._depth.get(path, 0)
        a0, b0 = self.blocks(path)[0]
        chunks = [1] * d + [max(b0 - a0, 1), *a.shape[d + 1 :]]
        meta = {"shape": list(a.shape), "chunks": chunks, "compressor": _COMPRESSOR}
        return _spec(self.folder, path) | {
            "metadata": meta,
            "dtype": np.dtype(a.dtype).name,
            "create": True,
        }

    def write(self, path: Path, index: tuple[int, ...], a: int, piece: np.ndarray) -> None:
        """Writes rows [a, a + len(piece)) of the slice `index` of leaf `path`."""
        want = self._stored[path]
        if piece.dtype != want.dtype or piece.shape[1:] != want.shape[len(index) + 1 :]:
            raise CheckpointError(
                f"{param_name(path)}: piece {piece.dtype}{list(piece.shape)} does not fit "
                f"{np.dtype(want.dtype)}{list(want.shape)}"
            )
        sel = (*index, slice(a, a + piece.shape[0]))
        self._stores[path].with_transaction(self._txn)[sel].write(piece).copy.result()
        self._written[path] += piece.size
        self._pending += piece.nbytes
        if self._pending >= TXN_BYTES:
            self._commit()

    def _commit(self) -> None:
        """Commits this batch in the background (after the previous one): compression and
        writing overlap the reading of the next batch; at most two batches are held."""
        if self._committing is not None:
            self._committing.result()
        self._committing = self._txn.commit_async()
        self._txn, self._pending = ts.Transaction(), 0

    def abort(self) -> None:
        """Drops the open batch and waits for the one in flight, so that nothing writes into
        the folder once the caller removes it."""
        self._txn.abort()
        if self._committing is not None:
            try:
                self._committing.result()
            except Exception:  # the caller is raising the original error
                pass

    def close(self) -> None:
        """Commits, checks every element of every leaf was written, writes `_METADATA`."""
        self._commit()
        self._committing.result()
        short = [p for p, n in self._written.items() if n != math.prod(self._stored[p].shape)]
        if short:
            raise CheckpointError(f"{self.folder}: {param_name(short[0])} not fully written")
        (self.folder / "_METADATA").write_text(json.dumps(_tree_metadata(self._stored)))


def _spec(folder: FsPath, path: Path) -> dict:
    kv = {"driver": "ocdbt", "base": f"file://{folder}/", "path": param_name(path)}
    return {"driver": "zarr", "kvstore": kv, "recheck_cached_data": False}


def _tree_metadata(stored: Mapping[Path, object]) -> dict:
    """Orbax's `_METADATA` for a pure dict of numpy leaves (zarr v2 on OCDBT)."""
    tree = {
        str(tuple(map(str, p))): {
            "key_metadata": [{"key": str(k), "key_type": 2} for k in p],
            "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
        }
        for p in stored
    }
    return {
        "tree_metadata": tree,
        "use_ocdbt": True,
        "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }


# --------------------------------------------------------------------------- reading


class StateReader:
    """Reads blocks of the stored leaves of `DIR/state` (missing chunks are errors)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = FsPath(folder).absolute()
        try:
            meta = json.loads((self.folder / "_METADATA").read_text())
            self.names = {param_name(tuple(k)) for k in map(_keys, meta["tree_metadata"].values())}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.folder}: unreadable Orbax _METADATA ({e})") from None
        self._ctx = ts.Context({"file_io_concurrency": {"limit": 32}})
        self._stores: dict[Path, ts.TensorStore] = {}

    def open(self, path: Path) -> ts.TensorStore:
        if path not in self._stores:
            spec = _spec(self.folder, path) | {"fill_missing_data_reads": False, "open": True}
            try:
                self._stores[path] = ts.open(spec, context=self._ctx).result()
            except ValueError as e:
                msg = f"{self.folder}: array {param_name(path)}: {_first(e)}"
                raise CheckpointError(msg) from None
        return self._stores[path]

    def read(self, path: Path, index: tuple[int, ...], a: int, b: int) -> np.ndarray:
        try:
            return self.open(path)[(*index, slice(a, b))].read().result()
        except ValueError as e:
            msg = f"{self.folder}: array {param_name(path)}: {_first(e)}"
            raise CheckpointError(msg) from None

    def check(self, stored: Mapping[Path, jax.ShapeDtypeStruct]) -> None:
        """Every data file the index references is whole, then every expected leaf is present
        with its shape and dtype, and nothing else. The file check comes first: opening an
        array reads its metadata through the index, from whichever data file holds it, and a
        missing or cut file would otherwise surface as that array's store error."""
        check_data_files(self.folder)
        want = {param_name(p): p for p in stored}
        problems = [f"missing array {n}" for n in sorted(want.keys() - self.names)]
        problems += [f"unexpected array {n}" for n in sorted(self.names - want.keys())]
        for n in sorted(want.keys() & self.names):
            a, s = stored[want[n]], self.open(want[n])
            found = (s.dtype.numpy_dtype, tuple(s.shape))
            if found != (np.dtype(a.dtype), tuple(a.shape)):
                problems.append(
                    f"{n}: expected {np.dtype(a.dtype)} {list(a.shape)}, "
                    f"found {found[0]} {list(found[1])}"
                )
        raise_problems(problems, self.folder)


def _keys(entry: dict) -> list[str]:
    return [k["key"] for k in entry["key_metadata"]]


def _first(e: BaseException) -> str:
    return str(e).split(" [tensorstore_spec", 1)[0].splitlines()[0]


# --------------------------------------------------------------------------- marker


@dataclasses.dataclass(frozen=True)
class Marker:
    """The contents of `v4jax.json`."""

    config: ModelConfig
    dtype: Dtype
    release: bool  # DIR/release/ holds the source release's metadata

    def to_json(self) -> str:
        d = {"format": FORMAT, "version": VERSION, "dtype": str(self.dtype)}
        d |= {"release": self.release, "config": to_dict(self.config)}
        return json.dumps(d, indent=2) + "\n"


def read_marker(folder: str | os.PathLike) -> Marker:
    path = FsPath(folder) / MARKER
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted marker: invalid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a v4jax marker (format != {FORMAT!r})")
    if d.get("version") != VERSION:
        raise CheckpointError(f"{path}: version {d.get('version')!r}, this v4jax reads {VERSION}")
    try:
        cfg = d["config"]
        if isinstance(cfg, dict):  # markers written before rope_scaling was required omitted it
            cfg = {"rope_scaling": None} | cfg  # exactly when there was no YaRN
        return Marker(from_dict(cfg, "config"), Dtype.parse(d["dtype"]), bool(d.get("release")))
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: corrupted marker ({e})") from None


# --------------------------------------------------------------------------- detection


class Kind(enum.Enum):
    RELEASE = "an official release folder"
    ORBAX = "a v4jax Orbax checkpoint"


_NEEDS = {
    Kind.RELEASE: f"needs config.json and {INDEX_FILE} or {SINGLE_FILE}",
    Kind.ORBAX: f"needs {MARKER}",
}


def detect(folder: str | os.PathLike) -> Kind | None:
    f = FsPath(folder)
    if (f / MARKER).is_file():
        return Kind.ORBAX
    if (f / "config.json").is_file() and any((f / n).is_file() for n in (INDEX_FILE, SINGLE_FILE)):
        return Kind.RELEASE
    return None


def require(folder: str | os.PathLike, *kinds: Kind) -> Kind:
    """The kind of `folder`, or a CheckpointError saying what it is not (and what it seems)."""
    f = FsPath(folder)
    if not f.exists():
        raise CheckpointError(f"{f}: not a directory (does not exist)")
    if not f.is_dir():
        raise CheckpointError(f"{f}: not a directory")
    kind = detect(f)
    if kind in kinds:
        return kind
    wanted = " nor ".join(f"{k.value} ({_NEEDS[k]})" for k in kinds)
    if kind is not None:
        raise CheckpointError(f"{f}: is {kind.value}, not {wanted}")
    hint = ""
    if (f / STATE).is_dir():
        hint = f"; it holds {STATE}/ without {MARKER}: an incomplete or interrupted conversion"
    elif (f / "_METADATA").is_file():
        hint = f"; it is an Orbax checkpoint not written by v4jax (no {MARKER})"
    raise CheckpointError(f"{f}: not {wanted}{hint}")


def read_config(folder: str | os.PathLike) -> ModelConfig:
    """The config of a release folder (its config.json) or of a v4jax Orbax checkpoint (its
    marker), without reading any weights: what a command checks its inputs against before
    loading the model."""
    if require(folder, Kind.RELEASE, Kind.ORBAX) is Kind.ORBAX:
        return read_marker(folder).config
    return from_json(folder)


# --------------------------------------------------------------------------- restore


def placed(host: np.ndarray, where: jax.sharding.Sharding | None) -> jax.Array:
    """A host array -> a device array, each device taking only its own shard."""
    if where is None:
        return jax.numpy.asarray(host)
    return jax.make_array_from_callback(host.shape, where, lambda idx: host[idx])


def orbax_restore(
    state: str | os.PathLike,
    leaves: Mapping[Path, jax.ShapeDtypeStruct],
    shardings: Mapping[Path, jax.sharding.Sharding],
) -> dict[Path, jax.Array]:
    """Orbax PyTree restore of `DIR/state` ("keep"): a leaf with a sharding goes straight onto
    its devices (each host reading only its shards), the others to host memory and then onto
    the default device (as the release loader places them). Run after `StateReader.check`,
    whose data-file check must precede the threaded restore (`_stray_callbacks_muted`)."""
    import orbax.checkpoint as ocp  # heavy import, only where Orbax itself reads

    def args(p, a):
        if p in shardings:
            return ocp.ArrayRestoreArgs(sharding=shardings[p], global_shape=a.shape, dtype=a.dtype)
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype)

    target, restore_args = _nested(leaves), _nested({p: args(p, a) for p, a in leaves.items()})
    try:
        with _stray_callbacks_muted(), ocp.PyTreeCheckpointer() as ckptr:
            tree = ckptr.restore(state, args=ocp.args.PyTreeRestore(target, restore_args))
    except Exception as e:  # Orbax / tensorstore raise many types; report one line
        raise CheckpointError(f"{state}: Orbax restore failed: {_first(e)}") from None
    out = {}
    for p in leaves:
        node = tree
        for k in p:
            node = node[k]
        out[p] = node if p in shardings else placed(node, None)
    return out


def check_data_files(state: str | os.PathLike) -> None:
    """Every byte range that the newest version of the OCDBT database `state` references lies
    inside an existing data file: a truncated or partial copy is refused here, in one line,
    reading only the b-tree (kilobytes to megabytes), not the data. The files of each b-tree
    level are checked before that level is read, so a lost index node is named the same way."""
    folder = FsPath(state).absolute()
    if not (folder / "manifest.ocdbt").is_file():
        raise CheckpointError(f"{folder}: manifest.ocdbt is missing: {_INCOMPLETE}")
    ends: dict[str, int] = {}  # data file (relative to `folder`) -> bytes referenced
    try:
        kv = ts.KvStore.open(f"file://{folder}/").result()
        versions = ts.ocdbt.dump(kv).result()["versions"]
        root = max(versions, key=lambda v: v["generation_number"])["root"]
        nodes = [root["location"]] if "location" in root else []  # none: an empty tree
        while nodes:  # one b-tree level at a time, the nodes of a level read concurrently
            _check_ranges(folder, _note_range(nodes, {}))
            futures = [ts.ocdbt.dump(kv, n) for n in nodes]
            refs = [s for f in futures for s in _strings(f.result()) if _LOCATION.match(s)]
            _note_range(refs, ends)
            nodes = [s for s in refs if s.startswith("btreenode::")]
    except CheckpointError:  # a ValueError itself: already one line
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: unreadable OCDBT index ({_first(e)})") from None
    _check_ranges(folder, ends)


_INCOMPLETE = "an incomplete copy or conversion"


def _check_ranges(folder: FsPath, ends: Mapping[str, int]) -> None:
    problems = []
    for name, end in sorted(ends.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"data file {name} is missing")
        elif (size := path.stat().st_size) < end:
            problems.append(f"data file {name} is truncated ({size} bytes, {end} referenced)")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{folder}: {problems[0]}{more}: {_INCOMPLETE}")


_LOCATION = re.compile(r"^(?:value|btreenode)::(.+):(\d+):(\d+)$")


def _note_range(locations: list[str], ends: dict[str, int]) -> dict[str, int]:
    for loc in locations:
        name, offset, length = _LOCATION.match(loc).groups()
        ends[name] = max(ends.get(name, 0), int(offset) + int(length))
    return ends


def _strings(x) -> list[str]:
    """Every string inside a JSON-like value (`ts.ocdbt.dump` output)."""
    if isinstance(x, str):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    return [s for v in x for s in _strings(v)] if isinstance(x, list) else []


@contextlib.contextmanager
def _stray_callbacks_muted(quiet_s: float = 0.2, limit_s: float = 5.0):
    """When Orbax's restore fails, it closes its event loop while tensorstore reads are still
    in flight; each then reports "RuntimeError: Event loop is closed" from tensorstore's own
    threads (through `sys.unraisablehook`), dozens of tracebacks after the one-line error that
    no try/except can catch. On failure, wait until those callbacks have stopped (`quiet_s`
    without one, at most `limit_s`), dropping only them, then restore the hook and re-raise."""
    previous, last = sys.unraisablehook, [time.monotonic()]

    def hook(u) -> None:
        if u.exc_type is RuntimeError and str(u.exc_value) == "Event loop is closed":
            last[0] = time.monotonic()
        else:
            previous(u)

    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        last[0] = time.monotonic()
        end = last[0] + limit_s
        while time.monotonic() < min(end, last[0] + quiet_s):
            time.sleep(quiet_s / 4)
        raise
    finally:
        sys.unraisablehook = previous


def _nested(flat: Mapping[Path, object]) -> dict:
    """{path: x} -> nested dicts (the pure-dict form of the state)."""
    tree: dict = {}
    for p, x in flat.items():
        node = tree
        for k in p[:-1]:
            node = node.setdefault(k, {})
        node[p[-1]] = x
    return tree
