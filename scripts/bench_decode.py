"""End-to-end prefill and decode throughput of a whole model, side by side in one run (issue 16,
"What it must show": tiny-model prefill and decode tokens/s, new vs old path, and vs HF).

    .venv/bin/python scripts/bench_decode.py [--section fastpath] [--checkpoint DIR | --preset NAME]
        [--paths new,old,hf] [--batches 1,4] [--prompt-len 256] [--steps 64] [--reps 3]
        [--json runs/bench_decode.json]

Section `fastpath` (default) compares three ways of running the same weights:
- new: the default path (dropless grouped / gathered routed experts chosen by
  `experts.implementation("auto")`, activation-dtype matmul operands with float32 accumulation);
- old: the port's original numerics, `experts.implementation("dense")` (every expert on every
  token) and `layers.matmul_operands("float32")` (float32 HIGHEST operands);
- hf: Hugging Face transformers `DeepseekV4ForCausalLM` in float32 on the torch CPU backend
  (tests/oracles/hf.py loads the release folder), its own forward and KV cache, greedy.
Prefill = one call on a fresh cache with a [B, prompt-len] prompt (last-token logits); decode =
`--steps` greedy one-token steps after that prefill. The JAX paths are timed after a warm-up
call (the compile time, first call minus the median call, is reported on its own), with
`block_until_ready`, their timed calls taken in turn (round robin), so that load changes on a
shared machine hit every path alike; each figure is the median of `--reps` repetitions.

Default model: the bundled checkpoint tests/data/v4-tiny-flash (reference numerics, bf16
activations, as `v4jax.load` gives it). `--preset` builds random weights for a
`v4jax.config` preset instead (the HF path then loads an exported copy from a temporary folder).

Section `speculative` (issue 15 section 1; V3 report §5.4.3): MTP speculative
decoding (`v4jax.generate(..., speculative="mtp", draft_tokens=k)`) against plain decoding of
the same prompts, for every k in `--draft-tokens`, batch in `--batches` and temperature in
`--temperatures` (0 = greedy):

    .venv/bin/python scripts/bench_decode.py --section speculative --checkpoint DIR \
        --numerics bf16 --dtype float32 [--draft-tokens 1,2,3] [--temperatures 0,1]
        [--prompts-file FILE] [--prompt-len 64] [--steps 64]

Prompts are real text: `--prompt-len`-token slices of `--prompts-file`, by default of the
Python standard library modules that `scripts/train.py --data "$STDLIB/*.py"` holds out
(`held_out_split` at its default fraction), tokenised as training tokenises
(`v4jax.train.data.make_tokenizer`). EOS is ignored (every sequence makes `--steps` tokens).
Only the decode phase is timed: plain = the `generate` while-loop from the prefilled cache,
speculative = the verify-step while-loop from `speculative.start` (prefill, MTP prompt rows,
first token); warm-up first (compile reported on its own), then `--reps` round-robin rounds
(median). Reported per row: draft j's acceptance rate (verify steps that accepted >= j drafts
/ verify steps, summed over sequences), mean accepted drafts, emitted tokens per verify step,
both tok/s and their ratio, and, for greedy, whether the speculative tokens equal plain
greedy's (`same`; near-tie flips in bf16 activations are reported, not hidden).

Sections are entries of SECTIONS, each writing its own key of the JSON (merged into an existing
file); `prefix` (the prefix cache) is a reserved name for a later section.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import v4jax
from v4jax import config as v4config
from v4jax.decode import speculative as spec
from v4jax.decode.generate import _loop as plain_loop  # the while-loop `generate` runs
from v4jax.decode.sampling import Sampling
from v4jax.model import experts, layers
from v4jax.train.data import load_corpus, make_tokenizer, tokenizer_mode
from v4jax.train.packing import held_out_split

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "v4-tiny-flash"
PATHS = ("new", "old", "hf")
PRESETS = ("tiny", "small", "flash", "pro")
RESERVED = ("prefix",)  # later sections (not implemented yet)


# ---------------------------------------------------------------------------------------------
# Timing helpers


def timed(fn, reps: int) -> tuple[float, float]:
    """(first call seconds, median of `reps` further calls); `fn` blocks until it is done."""
    first = _clock(fn)
    return first, statistics.median(_clock(fn) for _ in range(reps))


def interleaved(warmups: dict, fns: dict, reps: int) -> dict[str, tuple[float, float]]:
    """name -> (seconds of its warm-up call, median seconds of fns[name]): every warm-up
    (the compiles) first, then `reps` rounds that call each fn once in turn, so that a load
    change on a shared machine hits every path alike."""
    first = {name: _clock(fn) for name, fn in warmups.items()}
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_clock(fn))
    return {name: (first[name], statistics.median(times[name])) for name in fns}


def _clock(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@contextlib.contextmanager
def jax_path(name: str):
    """The trace-time switches of a JAX path (both are part of jit's cache key)."""
    if name == "new":
        yield
        return
    with experts.implementation("dense"), layers.matmul_operands("float32"):
        yield


_greedy = jax.jit(lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32))


# ---------------------------------------------------------------------------------------------
# JAX paths (new / old)


def jax_prefill(model, prompt: np.ndarray, steps: int, path: str):
    """(fn, out): fn prefills `prompt` [B, S] on a fresh cache (room for `steps` more tokens)
    and leaves the logits and the cache in `out`."""
    b, s = prompt.shape
    tokens = jnp.asarray(prompt, jnp.int32)
    empty = model.init_cache(b, s + steps)
    out = {}

    def run():
        with jax_path(path):
            out["logits"], out["cache"] = model.prefill(tokens, empty)
        jax.block_until_ready(out["logits"])

    return run, out


def jax_decode(model, prefilled: dict, path: str):
    """(loop, out): loop(n) runs n greedy one-token steps from the `prefilled` cache and leaves
    the generated tokens in `out`."""
    tok0, cache0 = _greedy(prefilled["logits"]), prefilled["cache"]
    out = {}

    def loop(n: int):
        tok, cache, seen = tok0, cache0, []
        with jax_path(path):
            for _ in range(n):
                logits, cache = model.decode_step(tok, cache)
                tok = _greedy(logits)
                seen.append(tok)
        out["tokens"] = jax.block_until_ready(seen)

    return loop, out


def measure_jax(args, model, prompt: np.ndarray, paths: list[str]) -> tuple[dict, dict]:
    """Prefill and decode results of the JAX `paths`, their timed calls interleaved."""
    (b, s), n = prompt.shape, args.steps
    pre_fns = {p: jax_prefill(model, prompt, n, p) for p in paths}
    runs = {p: fn for p, (fn, _) in pre_fns.items()}
    pre = {}
    for p, (first, med) in interleaved(runs, runs, args.reps).items():
        pre[p] = dict(seconds=med, tokens_per_s=b * s / med, compile_s=max(first - med, 0.0))
    loops = {p: jax_decode(model, out, p) for p, (_, out) in pre_fns.items()}
    warm = {p: functools.partial(loop, 2) for p, (loop, _) in loops.items()}  # compiles the step
    full = {p: functools.partial(loop, n) for p, (loop, _) in loops.items()}
    dec = {}
    for p, (first, med) in interleaved(warm, full, args.reps).items():
        gen = np.stack([np.asarray(t) for t in loops[p][1]["tokens"]], axis=1)  # [B, steps]
        dec[p] = dict(seconds=med, tokens_per_s=b * n / med, compile_s=max(first - 2 * med / n, 0))
        dec[p]["_gen"] = gen
    return pre, dec


# ---------------------------------------------------------------------------------------------
# HF transformers (float32, torch CPU)


def hf_load(folder: Path):
    sys.path.insert(0, str(ROOT))  # the oracle lives with the tests (never imported by v4jax)
    from tests.oracles.hf import hf_model

    return hf_model(folder, "float32")


def hf_prefill(model, prompt: np.ndarray, reps: int) -> dict:
    import torch

    b, s = prompt.shape
    ids = torch.from_numpy(prompt.astype(np.int64))
    out = {}

    def run():
        with torch.inference_mode():
            out["o"] = model(input_ids=ids, use_cache=True, logits_to_keep=1)

    first, med = timed(run, reps)
    nxt = out["o"].logits[:, -1].argmax(-1, keepdim=True)
    res = dict(seconds=med, tokens_per_s=b * s / med, compile_s=0.0, warmup_s=first)
    return res | dict(_state=(nxt, out["o"].cache))


def hf_decode(model, state, steps: int, reps: int) -> dict:
    """Greedy steps with HF's own KV cache (a copy of the prefilled one per repetition), after
    a short warm-up loop."""
    import copy

    import torch

    nxt0, cache0 = state
    b = nxt0.shape[0]
    out = {}

    def loop(n: int) -> float:
        nxt, cache, seen = nxt0, copy.deepcopy(cache0), []
        t0 = time.perf_counter()  # the cache copy is not decode work
        with torch.inference_mode():
            for _ in range(n):
                o = model(input_ids=nxt, cache=cache, use_cache=True)
                cache, nxt = o.cache, o.logits[:, -1].argmax(-1, keepdim=True)
                seen.append(nxt)
        out["tokens"] = seen
        return time.perf_counter() - t0

    loop(min(steps, 2))
    med = statistics.median([loop(steps) for _ in range(reps)])
    generated = torch.cat(out["tokens"], dim=1).numpy().astype(np.int32)
    return dict(seconds=med, tokens_per_s=b * steps / med, compile_s=0.0, _gen=generated)


# ---------------------------------------------------------------------------------------------
# Section: fastpath


def load_jax(args):
    """(Model, release folder or None)."""
    if args.preset:
        cfg = getattr(v4config, args.preset)()
        return v4jax.init(cfg, numerics=args.numerics, dtype=args.dtype), None
    folder = Path(args.checkpoint)
    model = v4jax.load(folder, numerics=args.numerics, dtype=args.dtype, progress=False)
    return model, folder


def prompts(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """[B, S] random ids in [2, V) (no BOS / EOS), a different prompt per sequence."""
    return np.random.default_rng(seed).integers(2, vocab, (batch, length), dtype=np.int32)


def measure_batch(args, model, hf, b: int) -> list[dict]:
    """Prefill and decode rows for batch `b`, every requested path."""
    prompt = prompts(model.config.vocab_size, b, args.prompt_len)
    jax_paths = [p for p in args.paths if p != "hf"]
    print(f"  B={b}: {', '.join(args.paths)} ...", end="", flush=True)
    pre, dec = measure_jax(args, model, prompt, jax_paths) if jax_paths else ({}, {})
    if hf is not None:
        pre["hf"] = hf_prefill(hf, prompt, args.reps)
        dec["hf"] = hf_decode(hf, pre["hf"].pop("_state"), args.steps, args.reps)
    print(" done", flush=True)
    gens = {p: d.pop("_gen") for p, d in dec.items()}
    if "new" in gens:
        for p in gens.keys() - {"new"}:
            dec[p]["greedy_agree_with_new"] = float(np.mean(gens[p] == gens["new"]))
    pre = {p: pre[p] for p in args.paths}  # in the order asked for
    dec = {p: dec[p] for p in args.paths}
    return [
        dict(phase="prefill", batch=b, tokens=args.prompt_len, **ratios(pre)),
        dict(phase="decode", batch=b, tokens=args.steps, **ratios(dec)),
    ]


def ratios(by_path: dict) -> dict:
    out = {"paths": by_path}
    tps = {p: r["tokens_per_s"] for p, r in by_path.items()}
    if "new" in tps and "old" in tps:
        out["new_over_old"] = tps["new"] / tps["old"]
    if "new" in tps and "hf" in tps:
        out["new_over_hf"] = tps["new"] / tps["hf"]
    return out


def print_table(rows: list[dict], paths: list[str]) -> None:
    cols = [f"{p} tok/s" for p in paths] + ["new/old", "new/hf"]
    cols += [f"compile {p} s" for p in paths if p != "hf"]
    print("\n" + f"{'phase':8s} {'B':>2s} " + " ".join(f"{c:>13s}" for c in cols))
    for r in rows:
        cells = [f"{r['paths'][p]['tokens_per_s']:13.1f}" for p in paths]
        cells += [
            f"{r[k]:12.2f}x" if k in r else f"{'-':>13s}" for k in ("new_over_old", "new_over_hf")
        ]
        cells += [f"{r['paths'][p]['compile_s']:13.1f}" for p in paths if p != "hf"]
        print(f"{r['phase']:8s} {r['batch']:2d} " + " ".join(cells))


def fastpath(args) -> dict:
    model, folder = load_jax(args)
    hf, tmp = None, None
    if "hf" in args.paths:
        if folder is None:  # a preset: HF reads an exported copy of the same weights
            tmp = tempfile.TemporaryDirectory(prefix="bench_decode_")
            folder = Path(tmp.name) / "release"
            v4jax.export_hf(model, folder)
        hf = hf_load(folder)
    result = dict(setup=fastpath_setup(args, hf is not None), rows=[])
    for b in args.batches:
        result["rows"] += measure_batch(args, model, hf, b)
        write_json(args, result)  # after each batch: a run cut short keeps what it measured
    if tmp is not None:
        tmp.cleanup()
    print_table(result["rows"], args.paths)
    return result


def fastpath_setup(args, with_hf: bool) -> dict:
    setup = dict(
        model=args.preset or str(args.checkpoint),
        numerics=args.numerics,
        dtype=args.dtype,
        prompt_len=args.prompt_len,
        steps=args.steps,
        reps=args.reps,
        paths=args.paths,
        old_path='experts.implementation("dense") + layers.matmul_operands("float32")',
    )
    if with_hf:
        import torch

        setup |= dict(
            hf_dtype="float32", torch=torch.__version__, torch_threads=torch.get_num_threads()
        )
    return setup


# ---------------------------------------------------------------------------------------------
# Section: speculative

NO_EOS = -1  # no token equals it: every sequence makes exactly --steps tokens
HELDOUT = 0.02  # scripts/train.py's default --heldout: its split of the stdlib files


class BenchInputError(ValueError):
    """Bad input found after parsing (printed in one line)."""


def stdlib_heldout() -> list[str]:
    """Paths of the stdlib top-level modules that train.py's held-out split keeps out of the
    training of a model trained on `--data "$STDLIB/*.py"`."""
    corpus = load_corpus(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))
    _, held = held_out_split(len(corpus), HELDOUT)
    return [corpus.files[corpus.file[i]] for i in held]


def text_prompts(paths: list[str], tokenizer, batch: int, length: int):
    """-> ([batch, length] ids, [(path, start token)]): evenly spaced slices of the tokenised
    files long enough for one, prompt i from file i mod n (n such files)."""
    docs = []
    for path in paths:
        ids = np.asarray(tokenizer.encode(Path(path).read_text(encoding="utf-8")), np.int32)
        if len(ids) >= length:
            docs.append((path, ids))
    if not docs:
        raise BenchInputError(f"no prompt text holds {length} tokens: lower --prompt-len")
    per = -(-batch // len(docs))  # slices per file
    rows, where = [], []
    for i in range(batch):
        path, ids = docs[i % len(docs)]
        start = (i // len(docs) + 1) * (len(ids) - length) // (per + 1)
        rows.append(ids[start : start + length])
        where.append((path, start))
    return np.stack(rows), where


def plain_decode(model, tokens: np.ndarray, max_len: int, t: int, s: Sampling, out: dict):
    """fn: the plain `generate` while-loop (t tokens) from the prefilled prompts."""
    b, p = tokens.shape
    lengths = jnp.full((b,), p, jnp.int32)
    t0 = time.perf_counter()
    logits, cache = model.prefill(jnp.asarray(tokens), model.init_cache(b, max_len), lengths)
    jax.block_until_ready(logits)
    out["setup_first_s"] = time.perf_counter() - t0

    def run():
        out["tokens"] = jax.block_until_ready(plain_loop(model, logits, cache, t, s, NO_EOS)[0])

    return run


def spec_decode(model, tokens: np.ndarray, max_len: int, t: int, s: Sampling, k: int, out):
    """fn: the speculative verify-step while-loop from `speculative.start` (which prefills and
    emits the first token; untimed)."""
    b, p = tokens.shape
    kw = dict(k=k, sampling=s, max_new=t)
    lengths = np.full((b,), p, np.int32)
    t0 = time.perf_counter()
    st0 = spec.start(model, tokens, lengths, model.init_cache(b, max_len), eos=NO_EOS, **kw)
    jax.block_until_ready(st0)
    out["setup_first_s"] = time.perf_counter() - t0

    def run():
        out["state"] = jax.block_until_ready(spec.run(model, st0, **kw))

    return run


def speculative_case(args, model, tok, tokens: np.ndarray, temp: float) -> list[dict]:
    """Rows of one (batch, temperature): plain and every k, timed calls interleaved."""
    (b, p), t, ks = tokens.shape, args.steps, args.draft_tokens
    s, max_len = Sampling(temperature=temp), p + t + max(ks)
    outs = {"plain": {}} | {k: {} for k in ks}
    fns = {"plain": plain_decode(model, tokens, max_len, t, s, outs["plain"])}
    fns |= {k: spec_decode(model, tokens, max_len, t, s, k, outs[k]) for k in ks}
    times = interleaved(fns, fns, args.reps)
    first, med = times["plain"]
    plain = dict(seconds=med, tokens_per_s=b * t / med, compile_s=max(first - med, 0.0))
    plain["setup_first_s"] = outs["plain"]["setup_first_s"]
    ref = np.asarray(outs["plain"]["tokens"]) if temp == 0 else None
    rows = [spec_row(outs[k]["state"], k, temp, times[k], plain, ref) for k in ks]
    for k, row in zip(ks, rows, strict=True):  # what was drafted for: sequence 0's text
        row["spec"]["setup_first_s"] = outs[k]["setup_first_s"]
        row["sample"] = _text(tok, np.asarray(outs[k]["state"].out[0]).tolist())
    return rows


def _text(tok, ids: list[int]) -> str | None:
    try:
        return tok.decode(ids)
    except ValueError:  # ids the tokenizer lacks (a random model over bytes: ids >= 258)
        return None


def spec_row(st, k: int, temp: float, time: tuple, plain: dict, ref) -> dict:
    """One table / JSON row from the final `SpecState` (summed over the sequences)."""
    hist = np.asarray(st.accept_hist).sum(axis=0)  # [k+1]: verify steps that accepted 0..k
    steps = int(np.asarray(st.verify_steps).sum())
    b = st.n.shape[0]
    emitted = int(np.asarray(st.n).sum()) - b  # by verify steps (the first token: prefill)
    drafts = int(np.dot(np.arange(k + 1), hist))
    first, med = time
    row = dict(temperature=temp, batch=b, draft_tokens=k, accept_hist=hist.tolist())
    row |= dict(
        verify_steps=steps,
        emitted=emitted,
        drafts_emitted=int(np.asarray(st.accepted).sum()),
        accept_rate=[float(hist[j:].sum() / steps) for j in range(1, k + 1)],
        mean_accepted=drafts / steps,
        tokens_per_step=emitted / steps,
        cut_at_max_new=steps + drafts - emitted,  # accepted + bonus tokens past --steps
        plain=plain,
        spec=dict(seconds=med, tokens_per_s=emitted / med, compile_s=max(first - med, 0.0)),
    )
    row["spec_over_plain"] = row["spec"]["tokens_per_s"] / plain["tokens_per_s"]
    if ref is not None:  # greedy: speculative tokens == plain greedy tokens?
        diff = np.asarray(st.out) != ref
        bad = diff.any(axis=1)
        row |= dict(same=not bad.any(), mismatched_seqs=int(bad.sum()))
        row["first_diff"] = int(np.argmax(diff, axis=1)[bad].min()) if bad.any() else None
    return row


def speculative(args) -> dict:
    model, _ = load_jax(args)
    if model.config.num_mtp_layers == 0:
        raise BenchInputError("--section speculative needs a model with an MTP block")
    files = [args.prompts_file] if args.prompts_file else stdlib_heldout()
    tok = make_tokenizer(model.config.vocab_size)
    tokens, where = text_prompts(files, tok, max(args.batches), args.prompt_len)
    setup = fastpath_setup(args, False)
    del setup["paths"], setup["old_path"]
    setup |= dict(
        draft_tokens=args.draft_tokens,
        temperatures=args.temperatures,
        prompts=[dict(file=f, start_token=i) for f, i in where],
        prompts_held_out=not args.prompts_file,
        tokenizer=tokenizer_mode(model.config.vocab_size).value,
        timed="decode phase only (after prefill), EOS ignored; setup_first_s: the first "
        "prefill (plain) / speculative.start call, compile included, untimed otherwise",
    )
    result = dict(setup=setup, rows=[])
    for temp in args.temperatures:
        for b in args.batches:
            print(f"  T={temp:g} B={b}: plain, k={args.draft_tokens} ...", end="", flush=True)
            result["rows"] += speculative_case(args, model, tok, tokens[:b], temp)
            print(" done", flush=True)
            write_json(args, result)
    print_spec_table(result["rows"], max(args.draft_tokens))
    return result


def print_spec_table(rows: list[dict], kmax: int) -> None:
    acc = [f"acc@{j}" for j in range(1, kmax + 1)]
    cols = ["temp", "B", "k", *acc, "drafts/step", "tok/step", "plain tok/s", "spec tok/s"]
    cols += ["spec/plain", "compile plain/spec s", "same"]
    wide = {"plain tok/s": 11, "spec tok/s": 10, "compile plain/spec s": 20}
    print("\n" + " ".join(f"{c:>{wide.get(c, max(len(c), 5))}s}" for c in cols))
    for r in rows:
        rate = r["accept_rate"] + [None] * (kmax - r["draft_tokens"])
        cells = [f"{r['temperature']:4g}", f"{r['batch']:5d}", f"{r['draft_tokens']:5d}"]
        cells += [f"{a:5.3f}" if a is not None else f"{'-':>5s}" for a in rate]
        cells += [f"{r['mean_accepted']:11.3f}", f"{r['tokens_per_step']:8.3f}"]
        cells += [f"{r['plain']['tokens_per_s']:11.1f}", f"{r['spec']['tokens_per_s']:10.1f}"]
        cells += [f"{r['spec_over_plain']:9.2f}x"]
        cells += [f"{r['plain']['compile_s']:9.1f} / {r['spec']['compile_s']:<8.1f}"]
        same = "-" if "same" not in r else ("yes" if r["same"] else f"NO ({r['mismatched_seqs']})")
        print(" ".join(cells) + f" {same:>5s}")


SECTIONS = {"fastpath": fastpath, "speculative": speculative}
DEFAULT_PROMPT_LEN = {"fastpath": 256, "speculative": 64}


# ---------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return vals


def _path_list(text: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in PATHS]
    if not vals or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {PATHS}")
    return list(dict.fromkeys(vals))


def _float_list(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers >= 0")
    return list(dict.fromkeys(vals))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--section", default="fastpath", help=f"{list(SECTIONS)} (later: {list(RESERVED)})"
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=str(FIXTURE), help="release or Orbax folder")
    src.add_argument("--preset", choices=PRESETS, help="random weights for a v4jax.config preset")
    ap.add_argument("--numerics", default="reference", choices=["reference", "bf16"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--paths", type=_path_list, default=list(PATHS), help="subset of new,old,hf")
    ap.add_argument("--batches", type=_int_list, default=[1, 4], help="e.g. 1,4")
    ap.add_argument(
        "--prompt-len", type=int, help=f"prompt tokens per sequence {DEFAULT_PROMPT_LEN}"
    )
    ap.add_argument("--steps", type=int, default=64, help="decode steps per sequence")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    ap.add_argument("--json", default="runs/bench_decode.json", help="output JSON (merged)")
    spec_args = ap.add_argument_group("speculative section")
    spec_args.add_argument("--draft-tokens", type=_int_list, default=[1, 2, 3], help="e.g. 1,2,3")
    spec_args.add_argument("--temperatures", type=_float_list, default=[0.0, 1.0], help="0: greedy")
    spec_args.add_argument("--prompts-file", help="prompt text (default: held-out stdlib files)")
    args = ap.parse_args(argv)
    if args.section in RESERVED:
        ap.error(f"--section {args.section}: not implemented yet (reserved for a later section)")
    if args.section not in SECTIONS:
        ap.error(f"--section {args.section!r}: expected one of {list(SECTIONS)}")
    if args.prompt_len is None:
        args.prompt_len = DEFAULT_PROMPT_LEN[args.section]
    if args.section == "speculative" and args.steps < 2:
        ap.error(f"--steps {args.steps}: the speculative section needs >= 2 (verify steps)")
    if args.prompts_file and not Path(args.prompts_file).is_file():
        ap.error(f"--prompts-file {args.prompts_file}: no such file")
    for name in ("prompt_len", "steps", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.numerics == "reference" and args.dtype == "float32":
        ap.error("--dtype float32 needs --numerics bf16 (the reference numerics round to bf16)")
    if not args.preset and not Path(args.checkpoint).is_dir():
        ap.error(f"--checkpoint {args.checkpoint}: not a folder")
    return args


def write_json(args, result: dict) -> None:
    """Writes {meta, sections: {section: result}} to --json (rewritten as results come), keeping
    the other sections of an existing file."""
    dev = jax.devices()[0]
    meta = dict(
        backend=jax.default_backend(),
        device=dev.device_kind,
        jax=jax.__version__,
        host=platform.node(),
        cpus=os.cpu_count(),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    sections = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no or unreadable file
        with open(args.json) as f:
            sections = dict(json.load(f).get("sections", {}))
    sections[args.section] = result
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "sections": sections}, f, indent=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = jax.devices()[0]
    print(
        f"bench_decode {args.section}: {dev.device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}"
    )
    try:
        result = SECTIONS[args.section](args)
    except (v4jax.CheckpointError, v4jax.ConfigError, BenchInputError) as e:
        print(f"bench_decode: {e}", file=sys.stderr)
        return 2
    write_json(args, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
