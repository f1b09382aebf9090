"""Conversion throughput (MB/s) next to a plain sequential read of the same files, same run.

    .venv/bin/python scripts/bench_convert.py [--work DIR] [--json out.json] [--no-big]

Cases: the bundled `v4-tiny-flash` fixture and a synthetic release of random bytes for a
few-layer config with big tensors (about 1.4 GB, written streaming). Steps per case:
hf-to-orbax (keep), hf-to-orbax (bf16), orbax-to-hf (from keep). `read MB/s` reads the step's
source files sequentially (16 MiB blocks, page cache as warm as for the conversion); `ratio` =
conversion / read: close to 1 means the conversion is read-bound. `copy MB/s` copies the same
files next to the output (read + write + fsync, as the conversion ends): `vs copy` near 1 means
it is bound by plain file I/O.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile
import time

from v4jax import cli
from v4jax.checkpoint.convert import hf_to_orbax, orbax_to_hf
from v4jax.checkpoint.export import write_random_release
from v4jax.checkpoint.synthetic import large_config

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "v4-tiny-flash"


def check_args(ap: cli.Parser, args: argparse.Namespace) -> None:
    """--work must be an existing writable folder; --json's folder is created now."""
    if args.work is not None and not args.work.is_dir():
        ap.fail(f"--work {args.work}: not an existing folder")
    if args.work is not None and not os.access(args.work, os.W_OK):
        ap.fail(f"--work {args.work}: not writable")
    cli.output_file("--json", args.json)


def sequential_read(folder: pathlib.Path) -> tuple[int, float]:
    """Reads every file under `folder` in 16 MiB blocks: (bytes, seconds)."""
    buf, total, t0 = bytearray(16 << 20), 0, time.perf_counter()
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
    return total, time.perf_counter() - t0


def sequential_copy(folder: pathlib.Path, dst: pathlib.Path) -> tuple[int, float]:
    """Copies every file under `folder` into `dst` in 16 MiB blocks, fsync'd: (bytes, s)."""
    buf, total, t0 = bytearray(16 << 20), 0, time.perf_counter()
    dst.mkdir()
    for i, path in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):
        with open(path, "rb", buffering=0) as f, open(dst / str(i), "wb", buffering=0) as g:
            while n := f.readinto(buf):
                g.write(memoryview(buf)[:n])
                total += n
            os.fsync(g.fileno())
    seconds = time.perf_counter() - t0
    shutil.rmtree(dst)
    return total, seconds


def bench_case(name: str, src: pathlib.Path, work: pathlib.Path) -> list[dict]:
    rows = []
    steps = (
        ("hf-to-orbax keep", src, work / f"{name}-orbax", lambda s, d: hf_to_orbax(s, d)),
        (
            "hf-to-orbax bf16",
            src,
            work / f"{name}-orbax-bf16",
            lambda s, d: hf_to_orbax(s, d, dtype="bf16"),
        ),
        ("orbax-to-hf", work / f"{name}-orbax", work / f"{name}-hf", orbax_to_hf),
    )
    for step, s, d, fn in steps:
        sequential_read(s)  # warm the page cache as the conversion will find it
        nread, tread = sequential_read(s)
        ncopy, tcopy = sequential_copy(s, work / "copy")
        r = fn(s, d)
        rows.append(
            {
                "case": name,
                "step": step,
                "tensor_mb": r.nbytes / 1e6,
                "seconds": r.seconds,
                "convert_mb_s": r.mb_per_s,
                "read_mb_s": nread / 1e6 / tread,
                "ratio": r.mb_per_s / (nread / 1e6 / tread),
                "copy_mb_s": ncopy / 1e6 / tcopy,
                "vs_copy": r.mb_per_s / (ncopy / 1e6 / tcopy),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = cli.Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=pathlib.Path, default=None, help="scratch dir (default: tmp)")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--no-big", action="store_true", help="only the tiny fixture")
    args = ap.parse_args(argv)
    check_args(ap, args)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_convert-", dir=args.work))
    try:
        rows = bench_case("tiny-fixture", FIXTURE, work)
        if not args.no_big:
            t0 = time.perf_counter()
            nbytes = write_random_release(large_config(), work / "big", shards=2)
            print(
                f"synthetic big: {nbytes / 1e6:.0f} MB written in {time.perf_counter() - t0:.1f} s"
            )
            rows += bench_case("synthetic-big", work / "big", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = (
        f"{'case':14} {'step':17} {'MB':>8} {'s':>7} {'MB/s':>8} {'read MB/s':>10} {'ratio':>6} "
        f"{'copy MB/s':>10} {'vs copy':>8}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['case']:14} {r['step']:17} {r['tensor_mb']:8.1f} {r['seconds']:7.2f} "
            f"{r['convert_mb_s']:8.0f} {r['read_mb_s']:10.0f} {r['ratio']:6.3f} "
            f"{r['copy_mb_s']:10.0f} {r['vs_copy']:8.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
