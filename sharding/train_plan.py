"""Device-side arithmetic of a training-step plan (issue 11 §5, "Full-size plans").

`scripts/plan.py --train` compiles a whole train step ahead of time on fake devices; this
module holds the parts that only know meshes, shardings and compiled programs (no model):

- `like_params`: shardings for any tree whose leaves mirror the parameters (gradients,
  optimizer moments: ZeRO, each state leaf split exactly as its parameter), by key path.
- `tree_bytes`: total and per-device bytes of an abstract tree, from each leaf's own
  `sharding.shard_shape` (even shardings: every device holds one shard of each leaf).
- `collective_bytes`: bytes moved per step by each collective kind, read from the compiled
  (post-SPMD, per-device) HLO text, with ops inside while-loop bodies (the scanned layer
  segments, gradient accumulation) multiplied by the loops' trip counts.
- `partitioned_hlo`: the program right after SPMD partitioning, before the backend's own
  passes (XLA:CPU's float normalization turns every bf16 collective into a float32 one).
- `verdict`: does a per-device need fit a device's memory less a reserve.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import tempfile
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "COLLECTIVES",
    "TreeBytes",
    "collective_bytes",
    "like_params",
    "partitioned_hlo",
    "tree_bytes",
    "verdict",
]

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _dict_suffix(path) -> tuple:
    """The trailing run of dict keys of a pytree key path: the parameter path of a leaf of
    a params-shaped subtree (optax states nest such trees under tuple / attribute keys)."""
    out = []
    for k in reversed(path):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        out.append(k.key)
    return tuple(reversed(out))


def like_params(tree, specs: Mapping[tuple, PartitionSpec], mesh: Mesh):
    """`tree` (abstract leaves) -> the same tree of NamedShardings: a leaf whose trailing dict
    path is a parameter path in `specs` and whose rank matches takes that PartitionSpec (if it
    still divides the leaf); every other leaf (step counts, scalars) is replicated."""

    def pick(path, leaf):
        spec = specs.get(_dict_suffix(path))
        if spec is not None and len(spec) <= len(leaf.shape):
            named = NamedSharding(mesh, spec)
            try:
                named.shard_shape(leaf.shape)
                return named
            except ValueError:
                pass
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(pick, tree)


@dataclasses.dataclass(frozen=True)
class TreeBytes:
    total: int  # bytes of every leaf, unsplit
    per_device: int  # bytes of one shard of every leaf


def tree_bytes(tree) -> TreeBytes:
    """Bytes of an abstract tree whose leaves carry shardings (ShapeDtypeStructs)."""
    total = per_device = 0
    for a in jax.tree.leaves(tree):
        item = np.dtype(a.dtype).itemsize
        total += math.prod(a.shape) * item
        per_device += math.prod(a.sharding.shard_shape(a.shape)) * item
    return TreeBytes(total, per_device)


# ------------------------------------------------------------------------- HLO collectives

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4}
_BYTES |= {"u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_OP = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([\w\-]+)\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLEE = re.compile(
    r"\b(body|condition|calls|to_apply)=%?([\w.\-]+)|\bbranch_computations=\{([^}]*)\}"
)
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if dtype.startswith("f8"):
            item = 1
        elif dtype in _BYTES:
            item = _BYTES[dtype]
        else:
            continue
        total += math.prod(int(d) for d in dims.split(",") if d) * item
    return total


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    comps: dict[str, list[str]] = {}
    name, entry = None, ""
    for line in hlo.splitlines():
        if name is None:
            m = _COMP.match(line)
            if m:
                name = m.group(1)
                comps[name] = []
                if line.startswith("ENTRY"):
                    entry = name
        elif line.strip() == "}":
            name = None
        else:
            comps[name].append(line)
    return comps, entry


def collective_bytes(hlo: str) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """Per-device bytes per step of each collective kind in compiled HLO text.

    An op's bytes are its result's (the per-device shapes: the HLO is after SPMD partitioning;
    for an all-gather, the gathered array). An op's count is the product of the trip counts
    of the while loops it sits in (`known_trip_count`, which XLA records for the scans of
    the layer segments and the micro-batches, or a jax loop's limit in HLO from before XLA's
    loop analysis: `_trip_count`; a loop with neither counts once, and is listed as -1).
    Async pairs count once (the `-start` op's last result; `-done` is skipped).

    Returns ({kind: bytes}, [(while loop, trip count)])."""
    comps, entry = _computations(hlo)
    mult: dict[str, int] = {}
    loops: list[tuple[str, int]] = []

    def visit(name: str, k: int) -> None:
        mult[name] = mult.get(name, 0) + k
        for line in comps.get(name, ()):
            trips = 1
            if " while(" in line:
                n = _trip_count(line, comps)
                trips = max(n, 1)
                loops.append((line.split("=")[0].split()[-1], n))
            for key, one, many in _CALLEE.findall(line):
                for callee in [one] if one else re.split(r"[,\s]+", many):
                    callee = callee.lstrip("%")
                    if callee in comps:
                        visit(callee, k * (trips if key == "body" else 1))

    visit(entry, 1)
    out = dict.fromkeys(COLLECTIVES, 0)
    for name, k in mult.items():
        for line in comps[name]:
            m = _OP.match(line)
            if not m:
                continue
            op = m.group(2)
            base = op.removesuffix("-start")
            if base not in out:
                continue
            shapes = m.group(1)
            if op.endswith("-start") and shapes.startswith("("):
                shapes = _SHAPE.findall(shapes)[-1:]  # (operand, result[, scratch]) tuple
                shapes = " ".join(f"{d}[{s}]" for d, s in shapes)
            out[base] += k * _shape_bytes(shapes)
    return out, loops


_COND = re.compile(r"condition=%?([\w.\-]+)")
_LIMIT = re.compile(r"s32\[\] constant\((\d+)\)")


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
    """A while op's trip count: XLA's `known_trip_count`, else (HLO before XLA's loop
    analysis, as `partitioned_hlo`'s) the limit of a jax loop's condition (counter from 0
    while < one s32 constant); -1 when neither is there."""
    m = _TRIPS.search(line)
    if m:
        return int(m.group(1))
    cond = _COND.search(line)
    body = comps.get(cond.group(1), []) if cond else []
    limits = [int(x) for b in body for x in _LIMIT.findall(b)]
    lt = any("direction=LT" in b for b in body)
    return limits[0] if lt and len(limits) == 1 else -1


def partitioned_hlo(lowered) -> tuple[str, jax.stages.Compiled]:
    """HLO text of `lowered` (a `jax.stages.Lowered`) right after XLA's SPMD partitioning:
    per-device shapes and collectives as the partitioner emits them, before the backend's own
    passes. XLA:CPU's float normalization, for one, runs every bf16 collective in float32
    (a bf16 all-gather becomes an f32 all-gather and a convert), so only this form shows the
    collective dtypes a GPU or TPU program keeps. With the compiled program (compiled once,
    dumping that pass). A one-device program has no partitioning pass: its HLO as lowered."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = {"xla_dump_to": tmp, "xla_dump_hlo_pass_re": "spmd-partitioning"}
        compiled = lowered.compile(compiler_options=opts)
        found = sorted(pathlib.Path(tmp).glob("*after_spmd-partitioning*.txt"))
        if found:
            return found[-1].read_text(), compiled
        before = sorted(pathlib.Path(tmp).glob("*before_optimizations.txt"))
        text = before[-1].read_text() if before else ""
        parts = _PARTS.search(text.partition("\n")[0])  # in the header when more than one
        if not before or (parts and int(parts[1]) > 1):
            raise RuntimeError("XLA wrote no HLO after its spmd-partitioning pass")
        return text, compiled


_PARTS = re.compile(r"num_partitions=(\d+)")


def verdict(need: int, hbm_bytes: float, reserve: float) -> tuple[bool, float]:
    """(fits, bytes over the budget) for a per-device need; budget = HBM less the reserve."""
    budget = hbm_bytes * (1 - reserve)
    return need <= budget, need - budget
