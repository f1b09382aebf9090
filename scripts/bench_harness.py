"""Requests per second of the lm-eval `v4jax` backend vs lm-eval's HF transformers `hf` backend
on the same weights (issue 13, "What it must show"), and the v4jax backend's compilations.

    .venv/bin/python scripts/bench_harness.py [--checkpoint DIR] [--batch-size 8]
        [--max-length 128] [--requests 64] [--docs 16] [--prompts 8] [--max-gen-toks 16]
        [--numerics bf16] [--json runs/bench_harness.json]

The same lm-eval `Instance`s go to both backends' `loglikelihood`, `loglikelihood_rolling`
and `generate_until` (synthetic word texts, fixed seed: contexts of 5-90 bytes with 3-15 byte
continuations; documents of 100-400 bytes, several windows each; prompts with 16 greedy tokens
and a stop sequence). Each request type runs twice in a row: `cold` includes v4jax's XLA
compilations (one per scoring bucket, prefill width and decode loop), `warm` is the same
requests again (compiled). The HF side is `DeepseekV4ForCausalLM` in float32 on the torch CPU
backend (tests/oracles/hf.py loads the release folder), wrapped by lm-eval's `HFLM` with a
byte-level HF tokenizer built here that gives the ids of v4jax's byte mode (byte b -> b + 2,
BOS 0 prepended); so the default v4jax numerics is `bf16` in float32, the same arithmetic.
The loglikelihood results of the two backends are compared (max abs difference, is_greedy
agreement); the rolling sums are not (HF's rolling windows also predict the BOS it prepends),
nor the generated texts (HF drops ids past the byte range, v4jax writes U+FFFD).

Default model: the bundled tiny checkpoint tests/data/v4-tiny-flash (CPU, one run; the
machine may be shared, so the figures are indicative).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "v4-tiny-flash"
WORDS = "the a model reads every byte of this text and predicts what comes next in it".split()
KINDS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(FIXTURE))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--requests", type=int, default=64, help="loglikelihood requests")
    ap.add_argument("--docs", type=int, default=16, help="loglikelihood_rolling documents")
    ap.add_argument("--prompts", type=int, default=8, help="generate_until prompts")
    ap.add_argument("--max-gen-toks", type=int, default=16)
    ap.add_argument("--numerics", default="bf16", choices=("bf16", "reference"))
    ap.add_argument("--json", default=str(ROOT / "runs" / "bench_harness.json"))
    return ap


def _text(rng, lo: int, hi: int) -> str:
    n, words = int(rng.integers(lo, hi)), []
    while len(" ".join(words)) < n:
        words.append(str(rng.choice(WORDS)))
    return " ".join(words)[:n]


def _instances(args):
    """The three request lists, as lm-eval builds them (Instance objects)."""
    from lm_eval.api.instance import Instance

    rng = np.random.default_rng(0)
    ll = [(_text(rng, 5, 90), " " + _text(rng, 2, 14)) for _ in range(args.requests)]
    docs = [(_text(rng, 100, 400),) for _ in range(args.docs)]
    gen_kw = {"until": ["\n\n"], "max_gen_toks": args.max_gen_toks, "do_sample": False}
    gen = [(_text(rng, 10, 60) + "\nA:", dict(gen_kw)) for _ in range(args.prompts)]
    make = lambda kind, rows: [Instance(kind, {}, a, i) for i, a in enumerate(rows)]
    return {
        "loglikelihood": make("loglikelihood", ll),
        "loglikelihood_rolling": make("loglikelihood_rolling", docs),
        "generate_until": make("generate_until", gen),
    }


def _byte_tokenizer():
    """An HF fast tokenizer with v4jax's byte-mode ids: byte b -> b + 2, BOS 0 / EOS 1."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from v4jax.tokenizer import BOS, EOS

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2 byte alphabet
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    vocab = {BOS: 0, EOS: 1, **{chars[b]: b + 2 for b in range(256)}}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS
    )


def _backends(args):
    import jax.numpy as jnp
    from lm_eval.models.huggingface import HFLM

    import v4jax
    from v4jax.eval.harness import V4JaxLM

    sys.path.insert(0, str(ROOT))  # the oracle lives with the tests (never imported by v4jax)
    from tests.oracles.hf import hf_model

    dtype = jnp.float32 if args.numerics == "bf16" else None
    model = v4jax.load(args.checkpoint, numerics=args.numerics, dtype=dtype, progress=False)
    sizes = dict(batch_size=args.batch_size, max_length=args.max_length)
    ours = V4JaxLM(pretrained=model, max_gen_toks=args.max_gen_toks, **sizes)
    hf = HFLM(
        pretrained=hf_model(args.checkpoint, "float32"),
        tokenizer=_byte_tokenizer(),
        add_bos_token=True,
        max_gen_toks=args.max_gen_toks,
        **sizes,
    )
    return {"v4jax": ours, "hf": hf}


def _run(lm, kind: str, instances) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = getattr(lm, kind)(instances, disable_tqdm=True)
    return time.perf_counter() - t0, out


def measure(args) -> dict:
    reqs = _instances(args)
    rows, outputs, lms = [], {}, _backends(args)
    for name, lm in lms.items():
        for kind in KINDS:
            for phase in ("cold", "warm"):
                c0 = lm.stats["compilations"] if name == "v4jax" else 0
                seconds, out = _run(lm, kind, reqs[kind])
                compiles = lm.stats["compilations"] - c0 if name == "v4jax" else None
                rows.append(
                    dict(backend=name, request_type=kind, phase=phase, requests=len(out),
                         seconds=seconds, requests_per_s=len(out) / seconds,
                         compilations=compiles)
                )  # fmt: skip
                outputs[name, kind] = out
    topk = lms["v4jax"].model.config.index_topk
    return {"rows": rows, **_agreement(topk, reqs["loglikelihood"], outputs)}


def _agreement(topk: int, instances, outputs) -> dict:
    """v4jax vs hf loglikelihoods. Inputs of at most 4 * index_topk tokens have no more ratio-4
    entries than the indexer keeps (no selection); longer ones also depend on the order of
    exact top-k ties, which torch and jax break differently (tests/test_hf_parity.py)."""
    ours, theirs = outputs["v4jax", "loglikelihood"], outputs["hf", "loglikelihood"]
    diff = np.array([abs(a[0] - b[0]) for a, b in zip(ours, theirs, strict=True)])
    n = np.array([len((r.args[0] + r.args[1]).encode()) for r in instances])  # + BOS - 1
    short = n <= 4 * topk
    same = np.mean([a[1] == b[1] for a, b in zip(ours, theirs, strict=True)])
    return {
        "loglikelihood_max_abs_diff_short": float(diff[short].max()) if short.any() else None,
        "loglikelihood_short_requests": int(short.sum()),
        "loglikelihood_max_abs_diff_all": float(diff.max()),
        "is_greedy_agreement": float(same),
        "short_input_tokens": 4 * topk,
    }


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch

    report = measure(args)
    report["settings"] = {
        **vars(args),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    print(
        f"{'backend':8} {'request type':22} {'phase':5} {'req':>4} {'s':>8} {'req/s':>8} {'XLA':>4}"
    )
    for r in report["rows"]:
        c = "-" if r["compilations"] is None else r["compilations"]
        print(
            f"{r['backend']:8} {r['request_type']:22} {r['phase']:5} {r['requests']:4d} "
            f"{r['seconds']:8.2f} {r['requests_per_s']:8.1f} {c:>4}"
        )
    short = report["loglikelihood_max_abs_diff_short"]
    print(
        f"loglikelihood v4jax vs hf: max |diff| {short:.2e} on the "
        f"{report['loglikelihood_short_requests']} inputs of <= {report['short_input_tokens']} "
        f"tokens, {report['loglikelihood_max_abs_diff_all']:.2e} on all (indexer top-k ties); "
        f"is_greedy agreement {report['is_greedy_agreement']:.2f}"
    )
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
