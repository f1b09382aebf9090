"""Generate from a checkpoint: encode a prompt or a chat, stream the reply, print tokens/s.

    .venv/bin/python scripts/generate.py --checkpoint DIR --chat "Hello"
    .venv/bin/python scripts/generate.py --checkpoint tiny-random --tokens 0,17,42 -n 16
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import v4jax
from v4jax.decode.sampling import sample
from v4jax.tokenizer import load_tokenizer


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="release folder or 'tiny-random'")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw text (BOS added)")
    src.add_argument("--chat", help="a user message, V4 chat format")
    src.add_argument("--tokens", help="comma-separated token ids")
    ap.add_argument("--system", default=None, help="system prompt for --chat")
    ap.add_argument("--thinking", action="store_true", help="thinking mode for --chat")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--numerics", default="reference", choices=["reference", "bf16"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--max-len", type=int, default=None)
    return ap.parse_args()


def _model(a):
    if a.checkpoint == "tiny-random":
        return v4jax.init(v4jax.config.tiny(), seed=a.seed, numerics=a.numerics, dtype=a.dtype)
    return v4jax.load(a.checkpoint, numerics=a.numerics, dtype=a.dtype)


def _prompt(a, tok, vocab: int) -> list[int]:
    if a.tokens:
        return [int(t) for t in a.tokens.split(",")]
    if a.chat is not None:
        msgs = ([{"role": "system", "content": a.system}] if a.system else [])
        ids = tok.encode_chat([*msgs, {"role": "user", "content": a.chat}], thinking=a.thinking)
    else:
        ids = tok.encode(a.prompt, add_bos=True)
    if max(ids) >= vocab:
        raise ValueError(f"the prompt uses token ids up to {max(ids)} but the model's vocabulary "
                         f"has {vocab}: use --tokens for small test models")
    return ids


def main() -> int:
    a = _args()
    if a.dtype == "float32" and a.numerics == "reference":
        a.numerics = "bf16"  # float32 is only defined for the bf16 mode
    model = _model(a)
    tok = load_tokenizer() if not a.tokens else None
    ids = _prompt(a, tok, model.config.vocab_size)
    s = v4jax.Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    cache = model.init_cache(1, a.max_len or len(ids) + a.max_new_tokens)
    t0 = time.perf_counter()
    logits, cache = model.prefill(np.asarray([ids]), cache)
    jax.block_until_ready(logits)
    t_prefill = time.perf_counter() - t0
    key, out, t1 = jax.random.key(a.seed), [], None
    for i in range(a.max_new_tokens):
        nxt = sample(logits, jax.random.fold_in(key, i), s)
        out.append(int(nxt[0]))
        print(tok.decode(out[-1:]) if tok else f"{out[-1]} ", end="", flush=True)
        if out[-1] == model.config.eos_token_id:
            break
        logits, cache = model.decode_step(jnp.asarray(nxt), cache)
        if t1 is None:
            jax.block_until_ready(logits)
            t1 = time.perf_counter()  # the first step includes compilation
    jax.block_until_ready(logits)
    steps = max(len(out) - 2, 1)
    decode_s = (time.perf_counter() - t1) if t1 else float("nan")
    print(f"\n\nprefill: {len(ids)} tokens in {t_prefill:.2f} s (incl. compilation), "
          f"{len(ids) / t_prefill:.1f} tok/s")
    print(f"decode: {len(out)} tokens, {steps / decode_s:.1f} tok/s after the first step")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, v4jax.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
