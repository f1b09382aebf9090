"""Sharding: the only code that knows about meshes and devices (README, "Layout").

- `rules`: logical -> mesh axis tables, `TRAIN` and `DECODE` (axes data, fsdp, expert, tensor).
- `mesh`: `make_mesh("expert=4 x tensor=2")`; `auto(mesh)` for user meshes.
- `specs`: PartitionSpecs / NamedShardings / abstract states from the parameter tree, the
  rules-coverage check, per-device parameter bytes.
- `constraints`: the activation hook model code calls with logical names (`constrain`,
  `mesh_axes`, `shard_map`), live only inside `use_rules(mesh, rules)`.
- `distributed`: `initialize()` for multi-host runs, with the launch recipes.

Usage: `v4jax.init(cfg, mesh=sharding.make_mesh("expert=8"))` (or `v4jax.load(path, mesh=)`)
places every parameter with its NamedSharding and runs `model.logits` sharded.
"""

from sharding.constraints import constrain, mesh_axes, use_rules
from sharding.distributed import initialize
from sharding.mesh import auto, make_mesh, parse_mesh_spec
from sharding.rules import AXES, DECODE, TRAIN, Regime, Rules, rules_for
from sharding.specs import (
    ParamBytes,
    abstract_state,
    check_rules,
    logical_axes,
    param_bytes,
    param_specs,
    resolve,
    state_shardings,
    zero_fill,
)

__all__ = [
    "AXES",
    "DECODE",
    "TRAIN",
    "ParamBytes",
    "Regime",
    "Rules",
    "abstract_state",
    "auto",
    "check_rules",
    "constrain",
    "initialize",
    "logical_axes",
    "make_mesh",
    "mesh_axes",
    "param_bytes",
    "param_specs",
    "parse_mesh_spec",
    "resolve",
    "rules_for",
    "state_shardings",
    "use_rules",
    "zero_fill",
]
