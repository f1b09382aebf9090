"""Training checkpoints: Orbax `CheckpointManager` over the whole train state.

A run directory's `checkpoints/` holds one Orbax step directory per save (`checkpoints/<step>/`),
each with three items:

- `state`: the train-state pytree (float32 master parameters, optimizer state, router biases and
  other frozen leaves, step, RNG key data), an ordinary Orbax PyTree checkpoint;
- `data`: the data iterator's state (a small JSON dict), so a resumed run sees the same batches;
- `meta`: JSON about the run (model config, run arguments, the last metrics).

Saves are asynchronous (the next steps run while the arrays are written) and atomic (Orbax
writes to a temporary directory and renames it when complete, so an interrupted save never
looks like a checkpoint); `keep` bounds how many are kept. Restoring needs an abstract target
(`jax.ShapeDtypeStruct` leaves, with shardings when the state lives on a mesh), which makes the
restore exact in dtype and placement.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


class Checkpointer:
    """`save(step, state, data=..., meta=...)`, `latest_step()`, `restore(step, target)`."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, asynchronous: bool = True):
        if keep < 1:
            raise ValueError(f"keep={keep}: must be >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True
        )
        # Handlers registered up front: a fresh process can then read one item (`read_meta`)
        # before anything else has told the manager what the other items are.
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def save(self, step: int, state: Any, *, data: dict, meta: dict) -> None:
        """Starts saving `state` (and the JSON items) as checkpoint `step`; returns at once
        when asynchronous. A step that already exists is left as it is."""
        if step in self._manager.all_steps():
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            meta=ocp.args.JsonSave(meta),
        )
        self._manager.save(step, args=args, force=True)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, step: int, target: Any) -> tuple[Any, dict, dict]:
        """(state, data, meta) of checkpoint `step`; `target` is the state's abstract pytree."""
        abstract = jax.tree.map(_abstract, target)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        out = self._manager.restore(step, args=args)
        return out["state"], dict(out["data"]), dict(out["meta"])

    def read_meta(self, step: int) -> dict:
        """The `meta` item alone (cheap: no arrays read), e.g. to check a run's config."""
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
