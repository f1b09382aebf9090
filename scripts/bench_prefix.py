"""Prefix cache: time to first token cold vs warm, and the bytes it stores (issue 15 §2).

    .venv/bin/python scripts/bench_prefix.py [--checkpoint DIR|tiny-random] [--prefix 4096]
        [--suffix 32] [--reps 3] [--every 128,1024] [--compact] [--json runs/bench_prefix.json]

One run, same weights, one request of `--prefix` shared tokens + `--suffix` new ones:
- cold: `model.prefill` of the whole prompt on a fresh cache (what `generate` does without a
  cache), then the first token;
- store: the first request through a `PrefixCache` (prefill paused at block ends to copy the
  state, blocks written to disk);
- warm (RAM): the same prefix again with another suffix, served from the RAM tier;
- warm (disk): a new `PrefixCache` object on the same folder (empty RAM tier: every record
  read from disk and checksummed, as another process would).
Each is timed after a warm-up call on other tokens (compilation excluded; the median of
`--reps`), `block_until_ready` on the first token. For each state spacing in `--every`
(`window_every`: 128 = the state at every block, the report's full sliding-window caching;
larger = periodic checkpoints) it reports bytes stored per token, split into compressed
entries and decode state, and the same layout's bytes for `flash()` at 1M tokens (computed
from the cache's shapes, no weights; plain and compact: FP8 nope dims, `--compact` measures
it on the model). Exactness: the warm first-token logits against cold
(max abs difference: chunked vs one-shot prefill, bf16 rounding in reference numerics) and
against the store run (the same chunking: must be 0), and whether the greedy first tokens
agree.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import v4jax  # noqa: E402
from v4jax import cli, config  # noqa: E402
from v4jax.decode.cache import init_cache  # noqa: E402
from v4jax.decode.prefix import _layout as record_layout  # noqa: E402
from v4jax.decode.prefix import block_size, prefill_cached  # noqa: E402

FIXTURE = ROOT / "tests" / "data" / "v4-tiny-flash"


def parse(argv):
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(FIXTURE))
    p.add_argument("--numerics", default=None, choices=["reference", "bf16"])
    p.add_argument("--prefix", type=int, default=4096)
    p.add_argument("--suffix", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--every", default="128,1024")
    p.add_argument("--compact", action="store_true", help="PrefixCache(compact=True) records")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    for flag, v in (("--prefix", a.prefix), ("--suffix", a.suffix), ("--reps", a.reps)):
        if v < 1:
            cli.fail(f"{flag} must be >= 1")
    try:
        a.every = [int(x) for x in a.every.split(",")]
    except ValueError:
        cli.fail(f"--every {a.every!r}: expected comma-separated token counts")
    if any(e < 1 or e % 128 for e in a.every):
        cli.fail(f"--every {a.every}: each must be a multiple of 128")
    a.json = cli.output_file("--json", a.json)
    return a


def load(a):
    if a.checkpoint == cli.TINY_RANDOM:
        return v4jax.init(config.tiny(), seed=0, numerics=a.numerics or "bf16")
    return v4jax.load(a.checkpoint, **({"numerics": a.numerics} if a.numerics else {}))


def timed(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def first_token(model, prompt, max_len, pc=None):
    cache = model.init_cache(1, max_len)
    if pc is None:
        logits, _ = model.prefill(np.asarray([prompt]), cache)
    else:
        logits, _ = prefill_cached(model, [prompt], cache, pc)
    return logits, jnp.argmax(logits, -1)


def _row_bytes(cfg, leaf, compact: bool) -> float:
    """Bytes of one row of a cache leaf as stored; `compact` packs K = V rows (bf16, head_dim
    wide) as FP8 nope dims + one exponent per 64 + bf16 rope dims (`prefix_pack`)."""
    if compact and leaf.shape[-1] == cfg.head_dim and leaf.dtype == jnp.bfloat16:
        nope = cfg.head_dim - cfg.rope_head_dim
        return nope + nope // 64 + 2 * cfg.rope_head_dim
    return leaf.shape[-1] * leaf.dtype.itemsize


def record_bytes(cfg, every: int, tokens: int, compact: bool = False) -> dict:
    """Bytes a prefix of `tokens` takes in the store (one sequence): entries of every block,
    a decode state every `every` tokens, plus the file headers (~1 KiB per record)."""
    blk = block_size(cfg)
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, 2 * blk, jnp.bfloat16))
    leaves = jax.tree.leaves(cache)

    class _M:  # record_layout reads only the config
        config = cfg

    lay = record_layout(_M, cache)

    def rows(leaf, n):  # bytes of n rows of every layer (leaf [R, 1, rows, dim])
        return leaf.shape[0] * n * _row_bytes(cfg, leaf, compact)

    per_block = sum(rows(leaves[i], blk // r) for i, r in lay.block)
    state = sum(rows(leaves[i], leaves[i].shape[2] if n is None else n) for i, n in lay.state)
    blocks = tokens // blk
    states = -(-tokens // every)
    return {
        "entries_per_token": float(per_block / blk),
        "state_bytes": float(state),
        "state_per_token": float(state * states / max(tokens, 1)),
        "total": float(per_block * blocks + state * states),
    }


def run(a) -> dict:
    model = load(a)
    cfg = model.config
    rng = np.random.default_rng(0)
    vocab = min(cfg.vocab_size, 50000)
    prefix = rng.integers(2, vocab, a.prefix).tolist()
    other = rng.integers(2, vocab, a.prefix).tolist()
    sfx = [rng.integers(2, vocab, a.suffix).tolist() for _ in range(a.reps + 3)]
    max_len = a.prefix + a.suffix
    out = {"prefix": a.prefix, "suffix": a.suffix, "compact": a.compact, "policies": {}}
    # cold: compile on `other`, then time
    first_token(model, other + sfx[0], max_len)
    t_cold, (cold_logits, cold_tok) = timed(
        lambda: first_token(model, prefix + sfx[0], max_len), a.reps
    )
    out["cold_s"] = t_cold
    for every in a.every:
        with tempfile.TemporaryDirectory() as d:
            pc = v4jax.PrefixCache(d, window_every=every, compact=a.compact)
            first_token(model, other + sfx[1], max_len, pc)  # compile: store path
            first_token(model, other + sfx[2], max_len, pc)  # compile: hit path
            t0 = time.perf_counter()
            stored_logits, _ = jax.block_until_ready(
                first_token(model, prefix + sfx[0], max_len, pc)
            )
            t_store = time.perf_counter() - t0

            def from_ram(pc=pc):
                return first_token(model, prefix + sfx[0], max_len, pc)

            t_ram, (warm, tok) = timed(from_ram, a.reps)

            def from_disk(pc_path=d, ev=every):
                return first_token(
                    model,
                    prefix + sfx[0],
                    max_len,
                    v4jax.PrefixCache(pc_path, window_every=ev, compact=a.compact),
                )

            t_disk, _ = timed(from_disk, a.reps)
            s = pc.stats()
        stored = record_bytes(cfg, every, a.prefix)
        out["policies"][str(every)] = {
            "store_s": t_store,
            "warm_ram_s": t_ram,
            "warm_disk_s": t_disk,
            "speedup_ram": t_cold / t_ram,
            "speedup_disk": t_cold / t_disk,
            "max_abs_logit_diff": float(jnp.abs(warm - cold_logits).max()),
            "same_first_token": bool((tok == cold_tok).all()),
            # the store run prefilled the prefix in chunks up to the same block end and the
            # suffix as one chunk from there: a restore must reproduce it bit for bit
            "max_abs_diff_vs_store_run": float(jnp.abs(warm - stored_logits).max()),
            "stored_bytes_measured": s["stored_bytes"],
            "bytes_per_token_measured": s["stored_bytes"] / (2 * a.prefix),  # 2 prefixes
            "bytes_per_token_layout": stored["entries_per_token"] + stored["state_per_token"],
            "flash_1m": record_bytes(config.flash(), every, 1 << 20),
            "flash_1m_compact": record_bytes(config.flash(), every, 1 << 20, compact=True),
        }
    out["platform"] = f"{platform.processor() or platform.machine()}, jax {jax.__version__}"
    return out


def show(out: dict) -> None:
    print(
        f"prefix {out['prefix']} + suffix {out['suffix']} tokens; cold TTFT {out['cold_s']:.3f} s"
    )
    print(
        "every  store_s  warm_ram_s  warm_disk_s  cold/ram  cold/disk  B/token"
        "  flash 1M GiB  same  max|dlogit| vs-store"
    )
    for every, r in out["policies"].items():
        f1m = r["flash_1m"]["total"] / 2**30
        print(
            f"{every:>5}  {r['store_s']:7.3f}  {r['warm_ram_s']:10.3f}  {r['warm_disk_s']:11.3f}"
            f"  {r['speedup_ram']:8.1f}  {r['speedup_disk']:9.1f}"
            f"  {r['bytes_per_token_measured']:7.0f}"
            f"  {f1m:12.2f}  {str(r['same_first_token']):>4}  {r['max_abs_logit_diff']:.2e}"
            f"  {r['max_abs_diff_vs_store_run']:.1e}"
        )


def main(argv=None) -> int:
    a = parse(argv)
    try:
        out = run(a)
    except (ValueError, OSError) as e:
        return cli.report(e)
    show(out)
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
