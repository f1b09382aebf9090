"""Checkpoints: the official release's safetensors files, v4jax's Orbax format, conversion.

- `safetensors`: torch-free reader (memory-mapped views, `pread` rows) and streaming writer of
  safetensors files and sharded folders.
- `names`: release tensor name <-> path (and index) in our parameter tree.
- `synthetic`: the release tensor inventory of a config; random release checkpoints.
- `release`: reading a release folder, every tensor checked: whole leaves (loading a model) or
  blocks of rows (conversion).
- `orbax_io`: the v4jax Orbax layout (marker, state, release layout), a block at a time.
- `export`: our state -> release files (layouts, tensor sources, shard writing).
- `convert`: the conversions and their staging (temporary folder, atomic rename, cleanup of
  folders left by killed conversions).
- `errors`: `CheckpointError`.

The weight encodings themselves (FP8 / FP4 with E8M0 scales) are `v4jax.numerics.quantize`.
Modules import only each other's public names (tests/test_checkpoint_layout.py).
"""

from v4jax.checkpoint.errors import CheckpointError

__all__ = ["CheckpointError"]
