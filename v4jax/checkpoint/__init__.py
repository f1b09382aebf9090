"""Checkpoints: safetensors I/O, the release <-> parameter-tree name map, loading."""

from v4jax.checkpoint.errors import CheckpointError

__all__ = ["CheckpointError"]
