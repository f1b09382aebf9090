"""Chat with a checkpoint in a terminal: a multi-turn REPL (issue 15, section 3).

    .venv/bin/python scripts/chat.py --checkpoint DIR [--thinking] [--system TEXT] [--verbose]
    .venv/bin/python scripts/chat.py --checkpoint tiny-random --max-new-tokens 8 --verbose

Each turn re-renders the whole conversation with the official V4 chat encoding
(`v4jax.chat.render_messages`: earlier turns lose their reasoning as the encoding requires) and
streams the reply as it is decoded: in thinking mode the reasoning under `[thinking]` (dimmed on
a colour terminal), then the answer under `[answer]`. The reply is parsed back into an assistant
message (`parse_completion`; a reply cut at --max-new-tokens is kept as far as it got).
Every turn goes through one `v4jax.PrefixCache` (RAM, or --prefix-cache DIR as well), so a turn
restores the previous turns' 128-token blocks and prefills only what follows them; --verbose
prints per turn the prompt tokens, those served from the cache and those prefilled, the time to
first token and the decode rate. The cache length (--max-len) is the same for every turn, so the
decode step compiles once.

Commands: /help, /reset, /save PATH, /think on|off, /quit (Ctrl-D too). Ctrl-C stops a reply.
A bad flag is one `error: ...` line, exit status 2, before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import v4jax
from v4jax import cli
from v4jax.chat import render_messages
from v4jax.chat.parse import parse_completion
from v4jax.chat.template import EOS, RESERVED, THINK_END
from v4jax.train.data import BYTE_OFFSET, ByteTokenizer, make_tokenizer

try:  # line editing and history for input(), where the platform has it
    import readline  # noqa: F401
except ImportError:  # pragma: no cover
    pass

HELP = """commands:
  /reset            forget the conversation (the --system prompt, the model and cache stay)
  /save PATH        write the conversation as JSON messages (generate.py --messages reads it)
  /think on|off     thinking mode for the next turns (now: {mode})
  /quit             leave (Ctrl-D too); Ctrl-C stops a reply"""


def _parser() -> cli.Parser:
    ap = cli.Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="release folder or 'tiny-random'")
    ap.add_argument("--system", default=None, help="system prompt")
    ap.add_argument("--thinking", action="store_true", help="start in thinking mode")
    ap.add_argument("--reasoning-effort", default=None, choices=["high", "max"])
    ap.add_argument("-n", "--max-new-tokens", type=int, default=512, help="per reply")
    ap.add_argument("--max-len", type=int, default=None, help="cache length (default 4096)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="sampling (turn k: seed + k), tiny-random")
    ap.add_argument("--numerics", default="reference", choices=["reference", "bf16"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prefix-cache", default=None, help="a folder: the cache's disk tier")
    ap.add_argument("-v", "--verbose", action="store_true", help="per-turn cache and timing")
    return ap


def check_flags(ap: cli.Parser, a: argparse.Namespace) -> None:
    """The flags on their own (no file read); a refusal names the flag."""
    if a.max_new_tokens < 1:
        ap.fail(f"--max-new-tokens must be >= 1, not {a.max_new_tokens}")
    if a.max_len is not None and a.max_len < 2:
        ap.fail(f"--max-len must be >= 2, not {a.max_len}")
    cli.check_sampling(a)
    if a.reasoning_effort is not None and not a.thinking:
        ap.fail("--reasoning-effort only applies with --thinking")
    if a.prefix_cache is not None and os.path.exists(a.prefix_cache):
        if not os.path.isdir(a.prefix_cache):
            ap.fail(f"--prefix-cache {a.prefix_cache} is not a folder")


def check_inputs(ap: cli.Parser, a: argparse.Namespace):
    """The sizes and the system prompt against the checkpoint's config (no weights loaded)
    -> the tokenizer. Library errors (a bad folder or config) propagate."""
    cfg = cli.checkpoint_config(a.checkpoint)
    if a.top_k > cfg.vocab_size:
        ap.fail(f"--top-k must be <= the vocabulary ({cfg.vocab_size}), not {a.top_k}")
    if a.max_len is None:
        a.max_len = min(4096, cfg.max_position_embeddings)
    if a.max_len > cfg.max_position_embeddings:
        ap.fail(
            f"--max-len {a.max_len} exceeds the model's max_position_embeddings "
            f"({cfg.max_position_embeddings})"
        )
    tok = make_tokenizer(cfg.vocab_size)  # UTF-8 bytes for small test vocabularies
    first = _system(a) + [{"role": "user", "content": ""}]
    need = len(tok.encode(render_messages(first, a.thinking).text)) + a.max_new_tokens
    if need > a.max_len:
        ap.fail(
            f"--max-len {a.max_len} is too small: the system prompt and --max-new-tokens "
            f"{a.max_new_tokens} alone need {need}"
        )
    return tok


def _system(a: argparse.Namespace) -> list[dict]:
    return [] if a.system is None else [{"role": "system", "content": a.system}]


def decode(tok, ids: list[int]) -> str:
    """Ids -> text, special tokens kept. Byte mode: an id past the byte range (a small random
    model may emit any id of its vocabulary) reads as U+FFFD."""
    if not isinstance(tok, ByteTokenizer):
        return tok.decode(ids)
    parts, run = [], []
    for i in ids:
        if i < 256 + BYTE_OFFSET:
            run.append(i)
        else:
            parts += [tok.decode(run), "\ufffd"]
            run = []
    return "".join([*parts, tok.decode(run)])


# Control characters other than newline and tab, shown as U+FFFD (a small random model writes
# any byte; an escape sequence would reach the terminal). The history keeps the text as is.
_CONTROLS = {c: "\ufffd" for c in [*range(9), *range(11, 32), 127]}


def _held_back(text: str, thinking: bool) -> str:
    """The part of a reply so far that is safe to print: no trailing U+FFFD (a character whose
    bytes are still coming) and, before `</think>`, no tail that may be its start."""
    text = text.rstrip("\ufffd")
    if thinking and THINK_END not in text:
        for k in range(len(THINK_END) - 1, 0, -1):
            if text.endswith(THINK_END[:k]):
                return text[:-k]
    return text


class ReplyPrinter:
    """Streams one reply: decodes all its ids so far and prints only the new complete text,
    the reasoning (thinking mode: before `</think>`) apart from the answer."""

    def __init__(self, tok, thinking: bool, out=None, dim: bool = False):
        self.tok, self.thinking, self.out = tok, thinking, out or sys.stdout
        self.ids: list[int] = []
        self.shown = {"reasoning": 0, "answer": 0}
        self.dim = ("\x1b[2m", "\x1b[0m") if dim else ("", "")
        self._write("[thinking] " + self.dim[0] if thinking else "[answer] ")
        self.in_answer = not thinking

    def add(self, token: int) -> None:
        self.ids.append(token)
        self._show(final=False)

    def text(self) -> str:
        """The reply's text, special tokens kept (a final EOS included)."""
        return decode(self.tok, self.ids)

    def finish(self) -> None:
        self._show(final=True)
        self._write(("" if self.in_answer else self.dim[1]) + "\n")

    def _show(self, final: bool) -> None:
        ids = self.ids[:-1] if self.ids and self.ids[-1] == self.tok.eos_id else self.ids
        text = decode(self.tok, ids)
        text = text if final else _held_back(text, self.thinking)
        reasoning, answer = "", text
        if self.thinking:
            cut = text.find(THINK_END)
            reasoning, answer = (
                (text, None) if cut < 0 else (text[:cut], text[cut + len(THINK_END) :])
            )
        self._part("reasoning", reasoning)
        if answer is not None:
            if not self.in_answer:
                self._write(self.dim[1] + "\n[answer] ")
                self.in_answer = True
            self._part("answer", answer)

    def _part(self, name: str, text: str) -> None:
        if len(text) > self.shown[name]:
            self._write(text[self.shown[name] :].translate(_CONTROLS))
            self.shown[name] = len(text)

    def _write(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()


def assistant_message(text: str, thinking: bool) -> dict:
    """A reply's text -> the assistant message appended to the history: `parse_completion`'s,
    or (a reply cut short or malformed) the reasoning / answer as far as they got, special
    tokens removed, so that the conversation still encodes."""
    try:
        m = parse_completion(text, "thinking" if thinking else "chat")
    except ValueError:
        text = text.removesuffix(EOS)
        reasoning, _, content = text.partition(THINK_END) if thinking else ("", "", text)
        if thinking and THINK_END not in text:
            reasoning, content = text, ""
        for token in RESERVED:
            reasoning, content = reasoning.replace(token, ""), content.replace(token, "")
        m = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if not m.get("tool_calls"):
        m.pop("tool_calls", None)
    return m


class Session:
    """The conversation, the model and the prefix cache; one method per command."""

    def __init__(self, a: argparse.Namespace, model, tok, pc: v4jax.PrefixCache):
        self.a, self.model, self.tok, self.pc = a, model, tok, pc
        self.thinking = a.thinking
        self.messages = _system(a)
        self.turns = 0
        term = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
        self.dim = term and "NO_COLOR" not in os.environ  # dimmed reasoning

    def turn(self, text: str) -> None:
        """One user turn: render the conversation, stream the reply, keep both messages."""
        convo = [*self.messages, {"role": "user", "content": text}]
        effort = self.a.reasoning_effort if self.thinking else None
        ids = self.tok.encode(render_messages(convo, self.thinking, reasoning_effort=effort).text)
        room = min(self.a.max_new_tokens, self.a.max_len - len(ids))
        if room < 1:
            print(
                f"the conversation is {len(ids)} tokens, the cache holds --max-len "
                f"{self.a.max_len}: /reset (or restart with a larger --max-len)"
            )
            return
        self.turns += 1
        stats0, start = self.pc.stats(), (time.perf_counter(), cli.compile_seconds())
        printer, times = self._stream(ids, room)
        if printer.ids:
            self.messages += [convo[-1], assistant_message(printer.text(), self.thinking)]
        if self.a.verbose and times:
            _report(self.turns, len(ids), stats0, self.pc.stats(), start, times)

    def _stream(self, ids: list[int], room: int):
        """Generates and prints up to `room` tokens -> (the printer, per token (time, compile
        seconds so far)). Ctrl-C stops the reply where it is; an error drops it."""
        a = self.a
        sampling = v4jax.Sampling(
            temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed + self.turns
        )
        printer, times = ReplyPrinter(self.tok, self.thinking, dim=self.dim), []
        stream = v4jax.generate_stream(
            self.model, ids, max_new_tokens=room, sampling=sampling, max_len=a.max_len,
            prefix_cache=self.pc,
        )  # fmt: skip
        try:
            for token in stream:  # stops at EOS; `room` tokens at most (no step after those)
                times.append((time.perf_counter(), cli.compile_seconds()))
                printer.add(token)
                if len(printer.ids) == room:
                    break
        except KeyboardInterrupt:
            printer.finish()
            print("(stopped)")
        except (ValueError, OSError) as e:  # e.g. the prefix cache's disk tier
            printer.finish()
            print(f"error: {e}".splitlines()[0] + " (reply dropped)")
            printer.ids.clear()
        else:
            printer.finish()
            if printer.ids and printer.ids[-1] != self.tok.eos_id:
                print(f"(cut at {len(printer.ids)} tokens)")
        finally:
            stream.close()
        return printer, times

    def command(self, line: str) -> bool:
        """A /command; False to leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            print(HELP.format(mode="on" if self.thinking else "off"))
        elif name == "/reset":
            self.messages = _system(self.a)
            print("conversation cleared")
        elif name == "/save":
            self.save(arg)
        elif name == "/think" and arg in ("on", "off", ""):
            self.thinking = arg == "on" if arg else self.thinking
            print(f"thinking {'on' if self.thinking else 'off'}")
        elif name == "/think":
            print(f"usage: /think on|off, not /think {arg}")
        else:
            print(f"unknown command {name} (/help lists them)")
        return True

    def save(self, path: str) -> None:
        if not path:
            print("usage: /save PATH")
            return
        p = pathlib.Path(path).expanduser()
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.messages, ensure_ascii=False, indent=1)
            p.write_text(text + "\n", encoding="utf-8")
        except OSError as e:
            print(f"cannot save to {path}: {e.strerror or e}")
            return
        print(f"saved {len(self.messages)} messages to {p}")


def _report(turn: int, n: int, s0: dict, s1: dict, start, times) -> None:
    """The verbose line of a turn (stderr): cache use, time to first token, decode rate."""
    (t0, c0), (t1, c1), (t2, c2) = start, times[0], times[-1]
    hit, computed = (s1[k] - s0[k] for k in ("hit_tokens", "prefill_tokens"))
    line = (
        f"turn {turn}: prompt {n} tokens = {hit} from the prefix cache + {computed} prefilled; "
        f"first token in {t1 - t0:.2f} s (compilation {c1 - c0:.2f} s)"
    )
    steps, run = len(times) - 1, (t2 - t1) - (c2 - c1)
    if steps:
        rate = f"{steps / run:.1f} tok/s" if run > 0 else "too fast to time"
        line += f"; {steps} decode steps at {rate} (compilation {c2 - c1:.2f} s)"
    print(line, file=sys.stderr, flush=True)


def repl(session: Session) -> None:
    """Reads lines until /quit or EOF; Ctrl-C at the prompt clears the line."""
    while True:
        try:
            line = input("you> ").strip()
            if line.startswith("/"):
                if not session.command(line):
                    return
            elif line:
                session.turn(line)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    check_flags(ap, a)
    if a.dtype == "float32" and a.numerics == "reference":
        a.numerics = "bf16"  # float32 is only defined for the bf16 mode
    try:
        tok = check_inputs(ap, a)
        pc = v4jax.PrefixCache(a.prefix_cache)
        t0 = time.perf_counter()
        model = cli.load_model(a.checkpoint, numerics=a.numerics, dtype=a.dtype, seed=a.seed)
    except (ValueError, TypeError, OSError, ImportError) as e:  # CheckpointError: ValueError
        return cli.report(e)
    except KeyboardInterrupt:
        return 130
    cli.track_compile_time()
    sys.stdout.reconfigure(errors="replace")
    mode = "utf-8 bytes" if isinstance(tok, ByteTokenizer) else "deepseek-v4"
    print(
        f"v4jax chat: {a.checkpoint} (tokenizer {mode}), thinking "
        f"{'on' if a.thinking else 'off'}, cache {a.max_len} tokens; /help for commands"
    )
    if a.verbose:
        where = f"model ready in {time.perf_counter() - t0:.1f} s; prefix cache: "
        print(where + (a.prefix_cache or "RAM only"), file=sys.stderr)
    repl(Session(a, model, tok, pc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
