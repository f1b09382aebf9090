"""Converts checkpoints between the official DeepSeek-V4 release and v4jax Orbax.

    .venv/bin/python scripts/convert.py hf-to-orbax SRC DST [--dtype keep|bf16] [--overwrite]
    .venv/bin/python scripts/convert.py orbax-to-hf SRC DST [--overwrite]

Streams tensor by tensor (host memory stays near one 16 MiB block), writes to a temporary
directory next to DST and renames it when complete. Exit status 2 with one `error: ...` line on
any bad input (a usage error, or the library's `CheckpointError` / `ConfigError`), checked
before anything is written.
"""

from __future__ import annotations

import os
import pathlib
import sys

from v4jax import cli
from v4jax.checkpoint.convert import hf_to_orbax, orbax_to_hf
from v4jax.checkpoint.errors import CheckpointError
from v4jax.config import ConfigError


def _parser() -> cli.Parser:
    """One-line usage errors naming the (sub-)command's help: `(see convert.py hf-to-orbax
    --help)`; the sub-command parsers are `cli.Parser`s too."""
    ap = cli.Parser(description=__doc__.splitlines()[0], prog_in_hint=True)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, text in (
        ("hf-to-orbax", "official release folder -> v4jax Orbax checkpoint"),
        ("orbax-to-hf", "v4jax Orbax checkpoint -> official release format"),
    ):
        p = sub.add_parser(name, help=text, description=text, prog_in_hint=True)
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "hf-to-orbax":
            p.add_argument(
                "--dtype",
                choices=("keep", "bf16"),
                default="keep",
                help="keep the release formats (default) or store dequantised bf16 weights",
            )
    return ap


def one_line(e: BaseException) -> str:
    """A multi-problem message on one line: 'head: problem; problem; ...'."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return " ".join(lines[:1]) + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")


def check_dst(ap: cli.Parser, dst: str) -> None:
    """DST's folder must be creatable: no ancestor is a file, the nearest existing one is
    writable (the library checks the rest: SRC, overwriting, DST inside SRC)."""
    path = pathlib.Path(dst).absolute()
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                ap.error(f"DST {dst}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                ap.error(f"DST {dst}: cannot write in {parent}")
            return


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    check_dst(ap, args.dst)
    progress = not args.no_progress
    try:
        if args.command == "hf-to-orbax":
            r = hf_to_orbax(
                args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=progress
            )
        else:
            r = orbax_to_hf(args.src, args.dst, overwrite=args.overwrite, progress=progress)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filled up; the partial output is already removed
        print(f"error: {e.filename or args.dst}: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the partial output is already removed
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(
        f"{args.command}: {r.tensors} tensors, {r.nbytes / 1e6:.1f} MB in {r.seconds:.1f} s "
        f"({r.mb_per_s:.0f} MB/s) -> {r.dst}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
