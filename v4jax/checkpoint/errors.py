"""Exceptions raised by the checkpoint readers and writers."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, malformed or inconsistent.

    The message is a single line that names the file (and the tensor, where one is
    concerned) so that a broken shard of a multi-hundred-gigabyte release can be
    found without a debugger.
    """
