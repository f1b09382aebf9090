"""Meshes from a small spec: 'expert=4 x tensor=2', 'fsdp=8', {'data': 2, 'expert': 4}.

Axis names are those of `sharding.rules.AXES`. The mesh's axes are `Auto` (GSPMD propagates
from the parameter and activation annotations); `jax.make_mesh` defaults to `Explicit` axes
("sharding in types"), which the model does not use, so `auto` converts any user mesh.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from sharding.rules import AXES

__all__ = ["auto", "make_mesh", "parse_mesh_spec"]


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """'expert=4 x tensor=2' (separators: 'x', ',', '*' or spaces) -> {'expert': 4, 'tensor': 2}."""
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for p in re.split(r"[\s,*]+", spec.strip()):
            if p in ("", "x"):
                continue
            name, eq, size = p.partition("=")
            if not eq or not size.isdigit():
                raise ValueError(f"mesh spec {spec!r}: {p!r} is not 'axis=size'")
            items.append((name, int(size)))
    out: dict[str, int] = {}
    for name, size in items:
        if name not in AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r} (axes: {AXES})")
        if name in out:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        if int(size) < 1:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} has size {size}")
        out[name] = int(size)
    if not out:
        raise ValueError(f"mesh spec {spec!r}: no axes")
    return out


def make_mesh(
    spec: str | Mapping[str, int], *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh over all (or the given) devices; the axis sizes must multiply to their number.

    Axes keep the canonical order of `AXES` (data, fsdp, context, expert, tensor), so the innermost,
    fastest-varying axis is `tensor`: on a GPU host tensor-parallel ranks sit on NVLink
    neighbours; across hosts `data` / `fsdp` are the outer axes.
    """
    sizes = parse_mesh_spec(spec)
    names = tuple(a for a in AXES if a in sizes)
    shape = tuple(sizes[a] for a in names)
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(names, shape, strict=True))} needs {math.prod(shape)} devices, "
            f"{len(devices)} available"
        )
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def auto(mesh: Mesh) -> Mesh:
    """`mesh` with every axis `Auto` (GSPMD); checks its axis names against `AXES`."""
    bad = [a for a in mesh.axis_names if a not in AXES]
    if bad:
        raise ValueError(f"mesh axes {bad} are not sharding axes; use names from {AXES}")
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
