"""Runs the model on the bundled `v4-tiny-flash` fixture and prints its agreement with the
official reference's logits (max / mean abs difference and top-1 per prompt and mode).

    .venv/bin/python scripts/fixture_parity.py [--fixture DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

import v4jax
from v4jax import cli
from v4jax.checkpoint.orbax_io import Kind, detect

DEFAULT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "v4-tiny-flash"


def check_args(ap: cli.Parser, args: argparse.Namespace) -> None:
    """--fixture must hold a release and golden.npz; --json's folder is created now."""
    if detect(args.fixture) is not Kind.RELEASE or not (args.fixture / "golden.npz").is_file():
        ap.fail(
            f"--fixture {args.fixture}: not a release folder with golden.npz (the official "
            "logits), like tests/data/v4-tiny-flash"
        )
    cli.output_file("--json", args.json)


def main(argv: list[str] | None = None) -> None:
    ap = cli.Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", type=pathlib.Path, default=DEFAULT)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    check_args(ap, args)
    golden = dict(np.load(args.fixture / "golden.npz"))
    rows = []
    print(f"{'mode':10} {'prompt':8} {'max abs':>9} {'mean abs':>9} {'top-1':>6}")
    for mode, prefix in (("reference", ""), ("bf16", "smooth_")):
        t0 = time.perf_counter()
        try:
            model = v4jax.load(args.fixture, numerics=mode, progress=False)
        except (v4jax.CheckpointError, v4jax.ConfigError) as e:  # a damaged fixture
            ap.fail(str(e).splitlines()[0])
        for length in ("001", "005", "037", "200", "300"):
            got = np.asarray(model.logits(golden[f"p{length}_tokens"][None]))[0, -1]
            want = golden[f"{prefix}p{length}_prefill_logits"]
            rows.append(_row(mode, f"p{length}", got, want))
        for name in ("tf_P003_K024", "tf_P150_K024"):
            got = np.asarray(model.logits(golden[f"{name}_tokens"][None]))[0]
            got = got[golden[f"{name}_positions"]]
            rows.append(_row(mode, name, got, golden[f"{prefix}{name}_logits"]))
        if mode == "reference":
            t = golden["mtp_tokens"]
            got = np.asarray(model.mtp_logits(t[None, :37], t[None, 1:38]))[0, -1]
            rows.append(_row(mode, "mtp", got, golden["mtp_last_logits"]))
        print(f"  ({mode}: {time.perf_counter() - t0:.1f} s including compilation)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _row(mode: str, name: str, got: np.ndarray, want: np.ndarray) -> dict:
    d = np.abs(got - want)
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    row = {
        "mode": mode,
        "prompt": name,
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "top1": top1,
    }
    print(f"{mode:10} {name:14} {d.max():9.3g} {d.mean():9.3g} {top1:6.2f}")
    return row


if __name__ == "__main__":
    main()
