"""Partition specs and shardings derived from the parameter tree's logical axis names.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds one logical name (or
None) per dim; stacked segments add a leading "layers" dim. `nnx.get_partition_spec` reads
those names; `resolve` maps them to mesh axes with a `Rules` table. This module knows the model
only through those names and the state's tree of paths.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.rules import Rule, Rules, rules_for

__all__ = [
    "ParamBytes",
    "abstract_state",
    "check_rules",
    "logical_axes",
    "param_bytes",
    "param_specs",
    "resolve",
    "spec_axes",
    "state_shardings",
    "zero_fill",
]

Path = tuple


def resolve(
    axes: tuple[str | None, ...],
    shape: tuple[int, ...],
    mesh_shape: Mapping[str, int],
    table: Mapping[str, Rule],
) -> PartitionSpec:
    """Logical names of an array's dims -> a PartitionSpec on a mesh of `mesh_shape`.

    Each dim takes the mesh axes of its rule, in order, skipping axes the mesh lacks (or of
    size 1), axes already used by an earlier dim, and axes that would stop dividing the dim.
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    used: set[str] = set()
    out = []
    for name, size in zip(axes, shape, strict=True):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(name)
        picked, n = [], 1
        for a in table[name]:
            k = mesh_shape.get(a, 1)
            if k > 1 and a not in used and size % (n * k) == 0:
                picked.append(a)
                used.add(a)
                n *= k
        out.append(None if not picked else picked[0] if len(picked) == 1 else tuple(picked))
    return PartitionSpec(*out)


def zero_fill(
    spec: PartitionSpec,
    shape: tuple[int, ...],
    mesh_shape: Mapping[str, int],
    zero: tuple[str, ...],
    skip: frozenset[int] | set[int] = frozenset(),
) -> PartitionSpec:
    """`spec` further split over each axis of `zero` (size > 1) it does not use yet: the axis
    goes to the dim with the largest shard that it still divides, never a dim in `skip`
    (parameters: the "layers" dim, as each rank runs every layer of the scanned stack). An axis
    no dim can take is left out."""
    parts = spec_axes(spec, len(shape))
    used = {a for p in parts for a in p}
    for a in zero:
        k = mesh_shape.get(a, 1)
        if k <= 1 or a in used:
            continue
        split = [math.prod(mesh_shape[x] for x in p) for p in parts]
        fits = [i for i, n in enumerate(shape) if i not in skip and n % (split[i] * k) == 0]
        if fits:
            i = max(fits, key=lambda j: (shape[j] // split[j], -j))
            parts[i] += (a,)
            used.add(a)
    return _spec(parts)


def spec_axes(spec: PartitionSpec, ndim: int) -> list[tuple[str, ...]]:
    """A PartitionSpec -> each of `ndim` dims' mesh axes as a tuple (() where whole)."""
    parts = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec]
    return parts + [()] * (ndim - len(parts))


def _spec(parts: list[tuple[str, ...]]) -> PartitionSpec:
    """`spec_axes`' inverse."""
    return PartitionSpec(*(None if not p else p[0] if len(p) == 1 else p for p in parts))


def logical_axes(state: nnx.State) -> dict[Path, tuple[str | None, ...]]:
    """Path -> logical names of each dim (None for an unannotated dim or leaf)."""
    specs = nnx.to_flat_state(nnx.get_partition_spec(state))
    return {tuple(p): tuple(v.get_value()) for p, v in specs}


def _shapes(state: nnx.State) -> dict[Path, jax.ShapeDtypeStruct]:
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def check_rules(state: nnx.State, rules: Rules | str) -> None:
    """Raises a ValueError naming every logical axis of `state` that `rules` has no rule for."""
    rules = rules_for(rules)
    missing: dict[str, Path] = {}
    for path, axes in logical_axes(state).items():
        for name in axes:
            if name is not None and name not in rules.params and name not in missing:
                missing[name] = path
    if missing:
        lines = [
            f"  {name!r} (e.g. on {'.'.join(map(str, path))})" for name, path in missing.items()
        ]
        raise ValueError(
            f"logical axes without a rule in the {rules.name} table of sharding/rules.py:\n"
            + "\n".join(lines)
        )


def param_specs(state: nnx.State, mesh: Mesh, rules: Rules | str) -> dict[Path, PartitionSpec]:
    """Path -> PartitionSpec of every parameter (checks the rules cover every logical axis)."""
    rules = rules_for(rules)
    check_rules(state, rules)
    shapes, mesh_shape = _shapes(state), dict(mesh.shape)
    return {
        p: param_spec(axes, shapes[p].shape, mesh_shape, rules)[1]
        for p, axes in logical_axes(state).items()
    }


def param_spec(
    axes: tuple[str | None, ...],
    shape: tuple[int, ...],
    mesh_shape: Mapping[str, int],
    rules: Rules,
) -> tuple[PartitionSpec, PartitionSpec]:
    """One parameter's (use, stored) specs: the table's, and that plus the ZeRO axes
    (`zero_fill`, never on the "layers" dim). They are equal under rules without ZeRO axes."""
    use = resolve(axes, shape, mesh_shape, rules.params)
    if not rules.zero:
        return use, use
    layers = frozenset(i for i, name in enumerate(axes) if name == "layers")
    return use, zero_fill(use, shape, mesh_shape, rules.zero, layers)


def _replace_leaves(state: nnx.State, values: Mapping[Path, object]) -> nnx.State:
    flat = [(p, v.replace(values[tuple(p)])) for p, v in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | str) -> nnx.State:
    """A state-shaped tree of NamedShardings (for `jax.jit` in_shardings)."""
    specs = param_specs(state, mesh, rules)
    return _replace_leaves(state, {p: NamedSharding(mesh, s) for p, s in specs.items()})


def abstract_state(state: nnx.State, mesh: Mesh, rules: Rules | str) -> nnx.State:
    """The state as ShapeDtypeStructs carrying their NamedShardings (AOT lowering, no memory)."""
    specs = param_specs(state, mesh, rules)
    shapes = _shapes(state)
    return _replace_leaves(
        state,
        {
            p: jax.ShapeDtypeStruct(
                shapes[p].shape, shapes[p].dtype, sharding=NamedSharding(mesh, s)
            )
            for p, s in specs.items()
        },
    )


@dataclasses.dataclass(frozen=True)
class ParamBytes:
    """Parameter bytes in total and on each device, and the large leaves kept whole."""

    total: int
    per_device: int
    replicated: tuple[tuple[str, int], ...]  # (path, bytes) of unsplit leaves >= the threshold


def param_bytes(
    state: nnx.State, mesh: Mesh, rules: Rules | str, *, large: int = 1 << 20
) -> ParamBytes:
    """Bytes of the parameters (abstract or placed) under `rules` on `mesh`.

    Even shardings give every device the same shard shapes, so per-device bytes are the sum of
    one shard of each leaf. `replicated` lists leaves of >= `large` bytes that no axis splits.
    """
    specs = param_specs(state, mesh, rules)
    total = per_device = 0
    whole = []
    for p, a in _shapes(state).items():
        nbytes = int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        shard = NamedSharding(mesh, specs[p]).shard_shape(a.shape)
        local = math.prod(shard) * np.dtype(a.dtype).itemsize
        total += nbytes
        per_device += local
        if local == nbytes and nbytes >= large and mesh.size > 1:
            whole.append((".".join(map(str, p)), nbytes))
    return ParamBytes(total, per_device, tuple(sorted(whole, key=lambda t: -t[1])))
