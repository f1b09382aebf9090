"""The command-line pieces every script in `scripts/` shares: a refusal is one line.

`scripts/` holds thin entry points (README, "Layout"), and each one refuses
a bad flag, file or size the same way, before anything expensive (loading weights, compiling,
measuring): exactly one `error: ...` line on stderr, no usage dump, no traceback, exit status 2
(argparse's own status for usage errors). This module is that convention, written once:

- `Parser`: an `argparse.ArgumentParser` whose usage errors are `error: MESSAGE (see --help)`;
  `Parser.fail` / `fail` refuse with `error: MESSAGE` for checks argparse cannot express.
- `output_file`: creates the folder of an output file named by a flag now, so that results
  computed for minutes are never lost to a missing folder at the end.
- `report`: a library error (a bad checkpoint, config or data file) as one line, exit status 2.
- `checkpoint_config`: a `--checkpoint`'s config, read without its weights, so that every size
  can be checked against the model before it is loaded; `load_model`: the model itself.
- `track_compile_time` / `compile_seconds`: time spent compiling (tracing, lowering to MLIR,
  XLA), from `jax.monitoring`, so that timings can report it apart.

It imports nothing beyond the `v4jax` package itself, and sets up no jax device.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import NoReturn

import jax

from v4jax import config
from v4jax.checkpoint import orbax_io

USAGE_STATUS = 2  # argparse's exit status for a usage error; every refusal uses it
TINY_RANDOM = "tiny-random"  # --checkpoint for a random `config.tiny()` model (no files)


def fail(message: str) -> NoReturn:
    """Refuses the command: `error: MESSAGE` on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_STATUS)


def report(e: BaseException) -> int:
    """Prints `error: ` and the first line of `e` on stderr; returns exit status 2, for
    `main` to return (a multi-problem library message keeps only its head line)."""
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    return USAGE_STATUS


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage dump), exit status 2.

    `prog_in_hint=True` names the program in the hint, `(see PROG --help)`: for sub-commands,
    whose help is not the top-level one. Sub-parsers are `Parser`s too: give `add_parser` the
    keyword as well.
    """

    def __init__(self, *args, prog_in_hint: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.prog_in_hint = prog_in_hint

    def error(self, message: str) -> NoReturn:
        see = f"{self.prog} --help" if self.prog_in_hint else "--help"
        fail(f"{message} (see {see})")

    fail = staticmethod(fail)


def output_file(flag: str, path: str | pathlib.Path | None) -> pathlib.Path | None:
    """The output file `flag` names (None: none given), its folder created now; refuses a
    folder given as the file, or a folder that cannot be created."""
    if path is None:
        return None
    path = pathlib.Path(path)
    if path.is_dir():
        fail(f"{flag} {path} is a directory: give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{flag} {path}: cannot create its folder ({e.strerror})")
    return path


def checkpoint_config(path: str) -> config.ModelConfig:
    """The config of --checkpoint: `TINY_RANDOM`, a release folder or a v4jax Orbax checkpoint,
    read without the weights; a bad one is a ValueError naming --checkpoint."""
    if path == TINY_RANDOM:
        return config.tiny()
    try:
        return orbax_io.read_config(path)
    except ValueError as e:  # CheckpointError, ConfigError
        raise ValueError(f"--checkpoint: {e}") from None


def check_sampling(a: argparse.Namespace) -> None:
    """--temperature / --top-k / --top-p on their own (the vocabulary bound comes later)."""
    if a.temperature < 0:
        fail(f"--temperature must be >= 0, not {a.temperature}")
    if a.top_k < 0:
        fail(f"--top-k must be >= 0 (0: off), not {a.top_k}")
    if not 0 < a.top_p <= 1:
        fail(f"--top-p must be in (0, 1] (1: off), not {a.top_p}")


def load_model(checkpoint: str, *, numerics: str, dtype: str, seed: int = 0):
    """--checkpoint as a model: `TINY_RANDOM` (a random `config.tiny()`, `seed`) or a folder."""
    import v4jax  # the package imports this module's users, not the other way round

    if checkpoint == TINY_RANDOM:
        return v4jax.init(config.tiny(), seed=seed, numerics=numerics, dtype=dtype)
    return v4jax.load(checkpoint, numerics=numerics, dtype=dtype)


_COMPILE_EVENTS = (  # jax._src.dispatch: tracing, lowering to MLIR, XLA compilation
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds = [0.0, False]  # total, listener registered


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration


def track_compile_time() -> None:
    """Starts counting compilation seconds (once per process)."""
    if not _compile_seconds[1]:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _compile_seconds[1] = True


def compile_seconds() -> float:
    """Seconds spent compiling since `track_compile_time`."""
    return _compile_seconds[0]
