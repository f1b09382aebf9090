"""Generate from a checkpoint: encode a prompt or a chat, stream the reply, print tokens/s.

    .venv/bin/python scripts/generate.py --checkpoint DIR --chat "Hello"
    .venv/bin/python scripts/generate.py --checkpoint DIR --chat "Weather in Paris?" \
        --tools tools.json          # the official tool format; tool calls printed parsed
    .venv/bin/python scripts/generate.py --checkpoint DIR --messages conversation.json
    .venv/bin/python scripts/generate.py --checkpoint tiny-random --tokens 0,17,42 -n 16

Every flag and the prompt are checked against the checkpoint's config (read without the weights)
before the model is loaded or compiled; a bad one is one `error: ...` line, exit status 2.
Timings report compilation (tracing, lowering and XLA compile, from `jax.monitoring`)
separately from the prefill and decode rates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import v4jax
from v4jax import cli
from v4jax.decode.sampling import sample
from v4jax.tokenizer import load_tokenizer


def _parser() -> cli.Parser:
    ap = cli.Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="release folder or 'tiny-random'")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw text (BOS added)")
    src.add_argument("--chat", help="a user message, V4 chat format")
    src.add_argument("--tokens", help="comma-separated token ids")
    src.add_argument(
        "--messages",
        help="a JSON file: a list of chat messages, or {'messages': [...], 'tools': [...]}",
    )
    ap.add_argument("--system", default=None, help="system prompt for --chat")
    ap.add_argument("--tools", default=None, help="a JSON file: a list of tools, for --chat")
    ap.add_argument("--thinking", action="store_true", help="thinking mode for chats")
    ap.add_argument(
        "--reasoning-effort", default=None, choices=["high", "max"], help="thinking chats"
    )
    ap.add_argument("-n", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--numerics", default="reference", choices=["reference", "bf16"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--max-len", type=int, default=None, help="cache length (default: needed)")
    ap.add_argument("--speculative", choices=["mtp"], default=None, help="MTP speculative decoding")
    ap.add_argument("--draft-tokens", type=int, default=None, help="drafts per step (default 1)")
    return ap


def check_flags(ap: cli.Parser, a: argparse.Namespace) -> None:
    """The flags on their own (no file read); a refusal names the flag."""
    if a.max_new_tokens < 1:
        ap.fail(f"-n must be >= 1, not {a.max_new_tokens}")
    cli.check_sampling(a)
    if a.max_len is not None and a.max_len < 1:
        ap.fail(f"--max-len must be >= 1, not {a.max_len}")
    if a.draft_tokens is not None and a.speculative is None:
        ap.fail("--draft-tokens only applies with --speculative mtp")
    if a.draft_tokens is not None and a.draft_tokens < 1:
        ap.fail(f"--draft-tokens must be >= 1, not {a.draft_tokens}")
    chat = a.chat is not None or a.messages is not None
    if a.chat is None and (a.system is not None or a.tools is not None):
        ap.fail("--system and --tools only apply to --chat (put them in --messages' file)")
    if not chat and (a.thinking or a.reasoning_effort):
        ap.fail("--thinking and --reasoning-effort only apply to --chat / --messages")


def check_inputs(ap: cli.Parser, a: argparse.Namespace):
    """The prompt and the sizes against the checkpoint's config (no weights loaded):
    (prompt ids, cache length, tokenizer or None). Library errors (a bad folder, config or
    chat message) propagate."""
    cfg = cli.checkpoint_config(a.checkpoint)
    if a.top_k > cfg.vocab_size:
        ap.fail(f"--top-k must be <= the vocabulary ({cfg.vocab_size}), not {a.top_k}")
    if a.speculative is not None and not cfg.num_mtp_layers:
        ap.fail("--speculative mtp: this checkpoint has no MTP block (num_nextn_predict_layers 0)")
    tok = None if a.tokens is not None else load_tokenizer()
    ids = _prompt(ap, a, tok, cfg.vocab_size)
    need = len(ids) + a.max_new_tokens - 1  # the last sampled token is not fed back
    if a.max_len is not None and a.max_len < need:
        ap.fail(
            f"--max-len {a.max_len} is too small: the prompt ({_tokens(len(ids))}) and "
            f"-n {a.max_new_tokens} need {need}"
        )
    max_len = a.max_len or need
    if max_len > cfg.max_position_embeddings:
        ap.fail(
            f"the prompt ({_tokens(len(ids))}) + -n {a.max_new_tokens} (or --max-len) exceed "
            f"the model's max_position_embeddings ({cfg.max_position_embeddings})"
        )
    return ids, max_len, tok


def _prompt(ap: cli.Parser, a: argparse.Namespace, tok, vocab: int) -> list[int]:
    if a.tokens is not None:
        parts = [p.strip() for p in a.tokens.split(",")]
        bad = [p for p in parts if not p.lstrip("-").isdigit()]
        if bad or not a.tokens.strip():
            what = f"{bad[0]!r} is not a token id" if bad and a.tokens.strip() else "no token ids"
            ap.fail(f"--tokens: {what} (expected e.g. 0,17,42)")
        ids = [int(p) for p in parts]
        if min(ids) < 0 or max(ids) >= vocab:
            ap.fail(f"--tokens: ids must be in [0, {vocab}) (the model's vocabulary)")
        return ids
    if a.chat is not None or a.messages is not None:
        opts = dict(thinking=a.thinking, reasoning_effort=a.reasoning_effort)
        ids = tok.encode_chat(_conversation(ap, a), **opts)
    else:
        ids = tok.encode(a.prompt, add_bos=True)
    if max(ids) >= vocab:
        flag = next(f for f in ("chat", "messages", "prompt") if getattr(a, f) is not None)
        flag = f"--{flag}"
        ap.fail(
            f"{flag}: the V4 tokenizer gives ids up to {max(ids)} but the model's "
            f"vocabulary has {vocab}: use --tokens for small test models"
        )
    return ids


def _json_file(ap: cli.Parser, flag: str, path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        ap.fail(f"{flag} {path}: {e.strerror or e}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        ap.fail(f"{flag} {path}: not a UTF-8 JSON file ({e})")


def _conversation(ap: cli.Parser, a: argparse.Namespace) -> list[dict]:
    """The messages of --chat (+ --system, --tools) or of the --messages file."""
    if a.messages is not None:
        data = _json_file(ap, "--messages", a.messages)
        tools = None
        if isinstance(data, dict):
            data, tools = data.get("messages"), data.get("tools")
        if not isinstance(data, list) or not data:
            ap.fail(f"--messages {a.messages}: expected a non-empty list of messages")
        if tools is not None:  # the {"messages", "tools"} form: tools on the system message
            data = list(data)
            if data[0].get("role") == "system":
                data[0] = {**data[0], "tools": tools}
            else:
                data.insert(0, {"role": "system", "content": "", "tools": tools})
        return data
    system = {"role": "system", "content": a.system or ""}
    if a.tools is not None:
        tools = _json_file(ap, "--tools", a.tools)
        if not isinstance(tools, list):
            ap.fail(f"--tools {a.tools}: expected a JSON list of tools")
        system["tools"] = tools
    head = [system] if a.system is not None or a.tools is not None else []
    return [*head, {"role": "user", "content": a.chat}]


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    check_flags(ap, a)
    if a.dtype == "float32" and a.numerics == "reference":
        a.numerics = "bf16"  # float32 is only defined for the bf16 mode
    try:
        ids, max_len, tok = check_inputs(ap, a)
        model = cli.load_model(a.checkpoint, numerics=a.numerics, dtype=a.dtype, seed=a.seed)
    except (ValueError, TypeError, OSError) as e:  # CheckpointError, ConfigError: ValueError
        return cli.report(e)
    cli.track_compile_time()
    if a.speculative is not None:
        out = _generate_speculative(a, model, tok, ids)
    else:
        out = _generate(a, model, tok, ids, max_len)
    if a.chat is not None or a.messages is not None:
        _print_parsed(tok, out, a.thinking)
    return 0


def _print_parsed(tok, out: list[int], thinking: bool) -> None:
    """The reply as an assistant message (reasoning, content, DSML tool calls parsed)."""
    try:
        message = tok.parse_completion(out, thinking=thinking)
    except ValueError as e:
        print(f"(the reply does not parse as a complete assistant message: {e})".splitlines()[0])
        return
    print("assistant message: " + json.dumps(message, ensure_ascii=False))


def _generate(a, model, tok, ids: list[int], max_len: int) -> list[int]:
    s = v4jax.Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    cache = model.init_cache(1, max_len)
    t0, c0 = time.perf_counter(), cli.compile_seconds()
    logits, cache = model.prefill(np.asarray([ids]), cache)
    jax.block_until_ready(logits)
    prefill_s, prefill_c = time.perf_counter() - t0, cli.compile_seconds() - c0
    key, out, steps = jax.random.key(a.seed), [], 0
    t1, c1 = time.perf_counter(), cli.compile_seconds()
    for i in range(a.max_new_tokens):
        nxt = sample(logits, jax.random.fold_in(key, i), s)
        out.append(int(nxt[0]))
        print(tok.decode(out[-1:]) if tok else f"{out[-1]} ", end="", flush=True)
        if out[-1] == model.config.eos_token_id or i == a.max_new_tokens - 1:
            break
        logits, cache = model.decode_step(jnp.asarray(nxt), cache)
        steps += 1
    jax.block_until_ready(logits)
    decode_s, decode_c = time.perf_counter() - t1, cli.compile_seconds() - c1
    print(
        f"\n\nprefill: {len(ids)} tokens in {prefill_s:.2f} s = compilation "
        f"{prefill_c:.2f} s + run {prefill_s - prefill_c:.2f} s "
        f"({_rate(len(ids), prefill_s - prefill_c)})"
    )
    if steps == 0:
        print("decode: 1 token, sampled from the prefill's logits (no decode step)")
        return out
    print(
        f"decode: {len(out)} tokens, {steps} steps in {decode_s:.2f} s = compilation "
        f"{decode_c:.2f} s + run {decode_s - decode_c:.2f} s "
        f"({_rate(steps, decode_s - decode_c)}, sampling included)"
    )
    return out


def _generate_speculative(a, model, tok, ids: list[int]) -> list[int]:
    """`v4jax.generate(..., speculative="mtp")`: one compiled loop, printed when done."""
    s = v4jax.Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    k = a.draft_tokens or 1
    t0, c0 = time.perf_counter(), cli.compile_seconds()
    g = v4jax.generate(
        model,
        [ids],
        max_new_tokens=a.max_new_tokens,
        sampling=s,
        speculative="mtp",
        draft_tokens=k,
    )
    seconds, compiled = time.perf_counter() - t0, cli.compile_seconds() - c0
    out = g.sequences()[0]
    print(tok.decode(out) if tok else " ".join(map(str, out)))
    steps, accepted = int(g.verify_steps[0]), int(g.accepted[0])
    print(
        f"\n\nspeculative (MTP, {k} draft{'s' if k > 1 else ''} per step): {len(out)} tokens in "
        f"{steps} verify steps, {accepted} drafts accepted "
        f"({(accepted + steps) / max(steps, 1):.2f} tokens per step); {seconds:.2f} s = "
        f"compilation {compiled:.2f} s + run {seconds - compiled:.2f} s "
        f"({_rate(len(out), seconds - compiled)}, prefill included)"
    )
    return out


def _tokens(n: int) -> str:
    return f"{n} token{'s' if n != 1 else ''}"


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f} tok/s" if seconds > 0 else "too fast to time"


if __name__ == "__main__":
    sys.exit(main())
