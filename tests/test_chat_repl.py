"""scripts/chat.py, the multi-turn REPL (issue 15, section 3), driven as a user drives it.

The main test runs the script in a pseudo-terminal (`pty.openpty`: the child's stdin, stdout and
stderr are a terminal, with line editing and Ctrl-C as a user has them), types turns and
commands and reads what comes back up to the next `you> ` prompt. The tiny random model writes
gibberish, so the checks are about structure: a labelled reply arrives, the verbose line's
token counts equal the official encoding of the conversation (computed here with
`v4jax.chat.render_messages` and the byte tokenizer, from the messages the REPL saved), the
second and third turns are served from the prefix cache, /save writes messages that encode
again, /reset, an unknown command, Ctrl-C at the prompt and /quit behave.

The streaming printer, the parsing of cut replies and Ctrl-C during a reply are checked on
their own, without a model (a reply cannot be interrupted reliably in a pty: 8 tiny tokens
take milliseconds).
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import io
import json
import os
import pathlib
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

import v4jax
from v4jax.chat import render_messages
from v4jax.tokenizer import EOS
from v4jax.train.data import ByteTokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "chat.py"
BYTES = ByteTokenizer()
BLOCK = 128  # the prefix cache's block for the presets (v4jax.decode.prefix.block_size)
TURN = re.compile(
    r"turn (\d+): prompt (\d+) tokens = (\d+) from the prefix cache \+ (\d+) prefilled; "
    r"first token in ([\d.]+) s"
)


def _chat_module():
    spec = importlib.util.spec_from_file_location("cli_chat", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


chat = _chat_module()


def _n_tokens(messages: list[dict], thinking: bool) -> int:
    """Prompt length of a conversation: official encoding, byte tokens (the tiny vocabulary)."""
    return len(BYTES.encode(render_messages(messages, thinking).text))


LAUNCH = (
    "import os, sys; os.close(os.open(sys.argv[1], os.O_RDWR)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


class Terminal:
    """A child process on a pseudo-terminal: type lines, read the screen up to a marker."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        # No os.fork in this (multithreaded, JAX-holding) test process: subprocess starts the
        # child from C. The launcher, a session leader, opens the terminal by name, which makes
        # it the controlling terminal (so Ctrl-C reaches the REPL as SIGINT), then execs.
        self.fd, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, os.ttyname(slave), *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        # a wide screen, so that readline never scrolls a long typed line
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 2000, 0, 0))
        self.pending, self.status = "", None

    def read_until(self, marker: str, timeout: float) -> str:
        """The output up to and including `marker` (line ends as '\\n')."""
        deadline = time.monotonic() + timeout
        while marker not in self.pending:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} within {timeout} s; got:\n{self.pending}"
            if select.select([self.fd], [], [], min(left, 1.0))[0]:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                assert chunk, f"the REPL exited before {marker!r}; got:\n{self.pending}"
                self.pending += chunk.decode("utf-8", "replace").replace("\r\n", "\n")
        cut = self.pending.index(marker) + len(marker)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def type(self, line: str, timeout: float = 60) -> str:
        """Types `line` + Enter; returns what follows the echoed line up to the next prompt."""
        os.write(self.fd, line.encode() + b"\r")
        out = self.read_until("you> ", timeout).split("\n", 1)[-1]
        return out.removesuffix("you> ").lstrip("\n")

    def wait_reading(self, timeout: float = 60) -> None:
        """Until the REPL sleeps in readline's select() on the terminal. A Ctrl-C that lands
        just before that call (after the prompt is drawn) only sets Python's signal flag, which
        readline checks on EINTR alone, so the KeyboardInterrupt would wait for the next key:
        a window of microseconds for a person, of many milliseconds on a loaded 2-core CI."""
        deadline, wchan = time.monotonic() + timeout, pathlib.Path(f"/proc/{self.proc.pid}/wchan")
        while "select" not in (state := wchan.read_text()) and "poll" not in state:
            assert time.monotonic() < deadline, f"the REPL is not reading: in {state!r}"
            time.sleep(0.01)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.status = self.proc.returncode
                return self.status
            try:  # drain, so that the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.2)[0]:
                    os.read(self.fd, 65536)
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"the REPL did not exit within {timeout} s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


def _turn_line(out: str, turn: int) -> tuple[int, int, int]:
    m = TURN.search(out)
    assert m, f"no verbose line for turn {turn} in:\n{out}"
    assert int(m[1]) == turn
    prompt, hit, prefilled = int(m[2]), int(m[3]), int(m[4])
    assert hit + prefilled == prompt, m[0]
    print(m.string[m.start() : m.string.find("\n", m.start())])  # shown with -s
    return prompt, hit, prefilled


def _user(messages: list[dict], thinking: bool, tokens: int) -> str:
    """A user message that makes the next prompt exactly `tokens` long."""
    base = _n_tokens([*messages, {"role": "user", "content": ""}], thinking)
    assert tokens > base
    return "x" * (tokens - base)  # one byte token per character


def _start(system: str, tmp_path) -> tuple[Terminal, str]:
    env = {**os.environ, "TERM": "dumb", "NO_COLOR": "1", "INPUTRC": os.devnull}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    argv = [str(SCRIPT), "--checkpoint", "tiny-random", "--max-new-tokens", "8", "--verbose"]
    argv += ["--numerics", "bf16"]  # compiles ~30% faster than "reference"; same REPL
    term = Terminal([*argv, "--system", system], env)
    return term, term.read_until("you> ", timeout=300)


def _saved(term: Terminal, path: pathlib.Path, n: int) -> list[dict]:
    assert f"saved {n} messages to {path}" in term.type(f"/save {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def test_chat_in_a_terminal(tmp_path):
    """Three turns, each prompt a whole number of cache blocks (128, 256, 384 tokens): each
    turn restores every block but the last and prefills one block, the new tokens (and the
    session compiles one prefill width: this test stays short)."""
    system = "You are a terse assistant."
    user1 = _user([{"role": "system", "content": system}], False, BLOCK)
    term, banner = _start(system, tmp_path)
    try:
        assert "thinking off" in banner and "/help" in banner, banner
        out1 = term.type(user1, timeout=900)  # compiles prefill and decode: minutes if loaded
        assert out1.startswith("[answer] "), out1
        assert _turn_line(out1, 1) == (BLOCK, 0, BLOCK)  # nothing cached yet

        msgs = _saved(term, tmp_path / "out" / "one.json", 3)  # its folder is created
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
        assert [m["content"] for m in msgs[:2]] == [system, user1]
        user2 = _user(msgs, False, 2 * BLOCK)
        out2 = term.type(user2, timeout=600)
        assert out2.startswith("[answer] "), out2
        # the prompt is the official encoding of the kept history, its first block restored
        assert _turn_line(out2, 2) == (2 * BLOCK, BLOCK, BLOCK)

        assert "thinking on" in term.type("/think on")
        msgs = _saved(term, tmp_path / "two.json", 5)
        out3 = term.type(_user(msgs, True, 3 * BLOCK), timeout=600)
        assert out3.startswith("[thinking] "), out3
        # thinking mode renders the history as chat mode did (no reasoning to drop yet)
        assert _turn_line(out3, 3) == (3 * BLOCK, 2 * BLOCK, BLOCK)

        msgs3 = _saved(term, tmp_path / "three.json", 7)
        assert msgs3[:5] == msgs and msgs3[5]["role"] == "user"
        assert msgs3[6]["role"] == "assistant" and "reasoning_content" in msgs3[6]
        if "[answer]" not in out3:  # the reply never closed its reasoning: all of it reasoning
            assert msgs3[6]["content"] == ""
        # the saved conversation encodes again (what generate.py --messages does with it)
        assert render_messages(msgs3, True).text.endswith(EOS)

        assert "conversation cleared" in term.type("/reset")
        assert _saved(term, tmp_path / "reset.json", 1) == [msgs[0]]  # the system prompt stays
        assert "/save PATH" in term.type("/help")
        os.write(term.fd, b"/quit\r")
        assert term.wait(timeout=60) == 0
    finally:
        term.close()


def test_commands_in_a_terminal(tmp_path):
    """No turn (nothing compiled): an unknown command, Ctrl-C and Ctrl-D at the prompt."""
    term, banner = _start("Be brief.", tmp_path)
    try:
        unknown = term.type("/frobnicate")
        assert unknown.strip().splitlines() == ["unknown command /frobnicate (/help lists them)"]
        assert "thinking on" in term.type("/think on")
        os.write(term.fd, b"half a line")
        term.read_until("half a line", timeout=60)  # the echo: readline has the line
        term.wait_reading()
        os.write(term.fd, b"\x03")  # Ctrl-C at the prompt: the line is dropped
        assert "Traceback" not in term.read_until("you> ", timeout=60)
        assert _saved(term, tmp_path / "t.json", 1) == [{"role": "system", "content": "Be brief."}]
        os.write(term.fd, b"\x04")  # Ctrl-D on an empty line: end of input
        assert term.wait(timeout=60) == 0
    finally:
        term.close()


def test_bad_argument_is_one_line():
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint", "tiny-random", "--max-new-tokens", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["error: --max-new-tokens must be >= 1, not 0"], r.stderr
    assert r.stdout == ""


# ---------------------------------------------------------------------------------------------
# The pieces, without a model


def _printer(thinking: bool):
    out = io.StringIO()
    return chat.ReplyPrinter(BYTES, thinking, out=out), out


def test_printer_prints_only_complete_characters():
    p, out = _printer(thinking=False)
    seen = []
    for b in BYTES.encode("hé€!"):  # 2- and 3-byte characters arrive one byte per token
        p.add(b)
        seen.append(out.getvalue())
    p.add(BYTES.eos_id)
    p.finish()
    assert seen == ["[answer] h", "[answer] h", "[answer] hé", "[answer] hé", "[answer] hé"] + [
        "[answer] hé€",
        "[answer] hé€!",
    ]
    assert out.getvalue() == "[answer] hé€!\n"  # EOS not shown
    assert "\ufffd" not in out.getvalue()


def test_printer_keeps_reasoning_apart():
    p, out = _printer(thinking=True)
    for b in BYTES.encode("why</thi"):
        p.add(b)
    assert out.getvalue() == "[thinking] why"  # '</thi' may be the end of the reasoning
    for b in BYTES.encode("nk>so"):
        p.add(b)
    p.add(BYTES.eos_id)
    p.finish()
    assert out.getvalue() == "[thinking] why\n[answer] so\n"


def test_printer_shows_control_bytes_as_replacement():
    p, out = _printer(thinking=False)
    for b in BYTES.encode("a\x1b[2Jb\n"):
        p.add(b)
    p.finish()
    assert out.getvalue() == "[answer] a\ufffd[2Jb\n\n"
    assert p.text() == "a\x1b[2Jb\n"  # the history keeps the text as written


@pytest.mark.parametrize(
    "text, thinking, content, reasoning",
    [
        ("r</think>a" + EOS, True, "a", "r"),  # complete: parse_completion's message
        ("half a thou", True, "", "half a thou"),  # cut inside the reasoning
        ("r</think>half an ans", True, "half an ans", "r"),
        ("plain<｜begin▁of▁sentence｜> reply", False, "plain reply", ""),  # special token dropped
    ],
)
def test_assistant_message(text, thinking, content, reasoning):
    m = chat.assistant_message(text, thinking)
    assert m == {"role": "assistant", "content": content, "reasoning_content": reasoning}
    history = [{"role": "user", "content": "q"}, m, {"role": "user", "content": "next"}]
    render_messages(history, thinking)  # the kept message encodes


def _session(**flags) -> object:
    a = argparse.Namespace(
        system="be brief", thinking=False, reasoning_effort=None, max_new_tokens=8,
        max_len=1024, temperature=0.0, top_k=0, top_p=1.0, seed=0, verbose=False,
    )  # fmt: skip
    vars(a).update(flags)
    return chat.Session(a, model=None, tok=BYTES, pc=v4jax.PrefixCache())


def test_ctrl_c_stops_a_reply(monkeypatch, capsys):
    prompts = []

    def stream(model, ids, **kw):
        prompts.append(ids)
        yield from BYTES.encode("ok")
        raise KeyboardInterrupt  # Ctrl-C while the third token is computed

    monkeypatch.setattr(v4jax, "generate_stream", stream)
    s = _session()
    s.turn("hi")
    out = capsys.readouterr().out
    assert out == "[answer] ok\n(stopped)\n"
    want = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert prompts == [BYTES.encode(render_messages(want, False).text)]
    assert s.messages == [*want, {"role": "assistant", "content": "ok", "reasoning_content": ""}]


def test_eof_leaves_and_commands(monkeypatch, capsys, tmp_path):
    lines = iter(["/think maybe", "/think on", "/save", f"/save {tmp_path}", ""])

    def fake_input(prompt):
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    s = _session()
    chat.repl(s)  # returns at EOF (Ctrl-D)
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["usage: /think on|off, not /think maybe", "thinking on", "usage: /save PATH"]
    assert out[3].startswith(f"cannot save to {tmp_path}: ")  # a folder, not a file
    assert s.thinking and s.messages == [{"role": "system", "content": "be brief"}]


def test_failed_or_oversized_turn_keeps_the_history(monkeypatch, capsys):
    def stream(model, ids, **kw):
        yield BYTES.encode("o")[0]
        raise OSError(28, "No space left on device")  # e.g. the cache's disk tier

    monkeypatch.setattr(v4jax, "generate_stream", stream)
    s = _session()
    s.turn("hi")
    assert capsys.readouterr().out.splitlines() == [
        "[answer] o",
        "error: [Errno 28] No space left on device (reply dropped)",
    ]
    assert s.messages == [{"role": "system", "content": "be brief"}]
    s = _session(max_len=20)  # the prompt alone fills the cache: refused before generating
    s.turn("a question longer than the cache")
    assert capsys.readouterr().out.startswith("the conversation is ")
    assert s.messages == [{"role": "system", "content": "be brief"}] and s.turns == 0
