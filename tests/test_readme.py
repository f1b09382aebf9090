"""The README tells the truth (issue 14 section 4): every fenced code block runs as written.

A reader copies the README's blocks; a block that no longer runs, a script flag that was
renamed or a file that moved is a broken promise. So the blocks are extracted and checked:

- ```python blocks run, each in a fresh namespace from the repository root (a block imports
  what it uses); ```bash blocks run with `bash -eo pipefail` from the root.
- A block whose source line before it is `<!-- readme-test: slow (why) -->` runs only under
  `-m slow` (it compiles a model: minutes on 2 shared cores); `<!-- readme-test: skip (why) -->`
  never runs (downloads, installs, long training, needs the real weights).
- Every bash block, run or not, is checked statically: `bash -n` syntax, every `scripts/...`
  path exists, and each `scripts/X.py` command line is parsed by that script's own argparse
  parser (flags, sub-commands, choices and value types; the script stops right after parsing).
- Repository paths and `v4jax.` / `sharding.` names quoted in the prose exist, every `*.md`
  the README mentions is in the repository, and the README's test command is the one CI runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_MARK = re.compile(r"<!--\s*readme-test:\s*(\w[\w-]*)\s*(?:\((.*?)\))?\s*-->")
_MODES = ("skip", "slow")
_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    mode: str  # "run", "slow" or "skip"
    why: str

    @property
    def id(self) -> str:
        return f"{self.lang}@L{self.line}"


@functools.cache
def _text() -> str:
    return README.read_text(encoding="utf-8")


@functools.cache
def blocks() -> tuple[Block, ...]:
    """The fenced blocks, each with the `readme-test` marker on the last non-blank line above."""
    text, out = _text(), []
    for m in _FENCE.finditer(text):
        above = [ln for ln in text[: m.start()].splitlines() if ln.strip()]
        mark = _MARK.fullmatch(above[-1].strip()) if above else None
        mode, why = (mark.group(1), mark.group(2) or "") if mark else ("run", "")
        line = text.count("\n", 0, m.start()) + 1
        out.append(Block(m.group(1), m.group(2), line, mode, why))
    return tuple(out)


def _params(lang: str, mode: str) -> list:
    marks = [pytest.mark.slow] if mode == "slow" else []
    return [
        pytest.param(b, id=b.id, marks=marks) for b in blocks() if b.lang == lang and b.mode == mode
    ]


def test_blocks_are_known_and_marked():
    """Only python / bash blocks, only known markers, a reason on every skip and slow."""
    assert blocks(), "no fenced blocks found in README.md"
    for b in blocks():
        assert b.lang in ("python", "bash"), f"README.md:{b.line}: fence language {b.lang!r}"
        assert b.mode in ("run", *_MODES), f"README.md:{b.line}: unknown marker {b.mode!r}"
        assert b.mode == "run" or b.why.strip(), f"README.md:{b.line}: marker gives no reason"
    stray = [m.group(0) for m in _MARK.finditer(_text()) if m.group(1) not in _MODES]
    assert not stray, f"unknown readme-test markers: {stray}"
    assert any(b.mode == "run" for b in blocks()), "every block is skipped or slow"


# --------------------------------------------------------------------------- python blocks


def test_python_blocks_compile():
    for b in blocks():
        if b.lang == "python":
            compile(b.code, f"README.md:{b.line}", "exec")  # SyntaxError names the line


def _exec(b: Block, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the blocks' mkdtemp()s land here
    exec(compile(b.code, f"README.md:{b.line}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("block", _params("python", "run"))
def test_python_block_runs(block, monkeypatch, tmp_path):
    _exec(block, monkeypatch, tmp_path)


@pytest.mark.parametrize("block", _params("python", "slow"))
def test_python_block_runs_slow(block, monkeypatch, tmp_path):
    _exec(block, monkeypatch, tmp_path)


# --------------------------------------------------------------------------- bash blocks


def commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block: words, with comments, continuations and
    operators (&&, ;, |, subshell parentheses) removed; environment assignments dropped."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        cmd: list[str] = []
        for word in [*lex, ";"]:
            if word in _OPERATORS:
                if cmd:
                    out.append(cmd)
                cmd = []
            elif cmd or not re.fullmatch(r"\w+=.*", word):
                cmd.append(word)
    return out


def invocations(code: str) -> list[tuple[str, list[str]]]:
    """(repository script, its arguments) for each command that runs a `scripts/` file."""
    out = []
    for cmd in commands(code):
        for k, word in enumerate(cmd):
            if word.startswith("scripts/") and word.endswith((".py", ".sh")):
                out.append((word, cmd[k + 1 :]))
                break
    return out


class _Parsed(Exception):  # raised by the patched parse_args: stop the script after parsing
    pass


@functools.cache
def _script(path: str):
    name = "readme_" + re.sub(r"\W", "_", path)
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(path: str, argv: list[str], monkeypatch, capsys) -> str | None:
    """None if the script's own parser accepts argv, else its error message."""
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            _script(path).main(argv)
        except _Parsed:
            return None
        except SystemExit as e:
            return f"exit {e.code}: {capsys.readouterr().err.strip()}"
    return "main() returned without parsing its arguments"


def test_bash_blocks_syntax():
    for b in blocks():
        if b.lang == "bash":
            r = subprocess.run(["bash", "-n"], input=b.code, capture_output=True, text=True)
            assert r.returncode == 0, f"README.md:{b.line}: {r.stderr.strip()}"


def test_bash_scripts_and_flags(monkeypatch, capsys):
    """Every `scripts/` command in every bash block (skipped ones too) names an existing
    script, and the script's argparse parser accepts the command line as written."""
    seen = 0
    for b in blocks():
        if b.lang != "bash":
            continue
        for path, argv in invocations(b.code):
            where = f"README.md:{b.line}: {path} {shlex.join(argv)}"
            assert (REPO / path).is_file(), f"{where}: no such script"
            seen += 1
            if path.endswith(".sh"):  # shell scripts: each argument is one they test for
                body = (REPO / path).read_text()
                missing = [a for a in argv if f'"{a}"' not in body]
                assert not missing, f"{where}: {path} never handles {missing}"
                continue
            problem = _parse(path, argv, monkeypatch, capsys)
            assert problem is None, f"{where}: {problem}"
    assert seen >= 10, f"only {seen} script commands found: is the parsing broken?"


def test_flag_check_catches_a_bad_flag(monkeypatch, capsys):
    """The checker itself: a renamed flag, a bad choice and a missing sub-command are errors."""
    assert _parse("scripts/convert.py", ["hf-to-orbax", "a", "b"], monkeypatch, capsys) is None
    for argv in (["hf-to-orbax", "a", "b", "--dtype", "fp8"], ["to-hf", "a", "b"], []):
        assert _parse("scripts/convert.py", argv, monkeypatch, capsys) is not None
    bad = ["--checkpoint", "tiny-random", "--tokens", "1", "--num-tokens", "4"]
    assert _parse("scripts/generate.py", bad, monkeypatch, capsys) is not None
    cmds = invocations('A=1 bash scripts/x.sh test && .venv/bin/python scripts/y.py --f "a b" \\\n'
                       "    -n 2  # c --g\n(cd x; python scripts/z.py)")  # fmt: skip
    assert cmds == [
        ("scripts/x.sh", ["test"]),
        ("scripts/y.py", ["--f", "a b", "-n", "2"]),
        ("scripts/z.py", []),
    ]


def _run_bash(b: Block, timeout: int) -> None:
    r = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", b.code],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert r.returncode == 0, f"README.md:{b.line}: exit {r.returncode}\n{r.stderr[-3000:]}"


def test_bash_blocks_run():
    """The unmarked bash blocks (cheap by contract: none compiles a model)."""
    for b in blocks():
        if b.lang == "bash" and b.mode == "run":
            _run_bash(b, timeout=60)


@pytest.mark.parametrize("block", _params("bash", "slow"))
def test_bash_block_runs_slow(block):
    _run_bash(block, timeout=1800)


def test_test_command_is_the_ci_command():
    """The README's test command is the one `.ci/run` runs on a clean checkout."""
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if "pytest" in ln]
    ours = [
        ln for b in blocks() if b.lang == "bash" for ln in b.code.splitlines() if "pytest" in ln
    ]
    assert ci and ours and set(ours) == set(ci), f"README {ours} vs .ci/run {ci}"


# --------------------------------------------------------------------------- prose


_ROOTS = ("v4jax/", "scripts/", "tests/", "sharding/", "docs/", ".ci/")


def _quoted() -> list[str]:
    return re.findall(r"`([^`\n]+)`", _FENCE.sub("", _text()))


def test_quoted_paths_exist():
    missing = [
        q for q in _quoted()
        if q.startswith(_ROOTS) and " " not in q and not (REPO / q).exists()
    ]  # fmt: skip
    assert not missing, f"README quotes paths that do not exist: {missing}"


def test_mentioned_docs_exist():
    """No reference to a document the repository does not ship (e.g. a design note)."""
    shipped = set()
    for _, subdirs, files in os.walk(REPO):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d != "runs"]
        shipped |= {f for f in files if f.endswith(".md")}
    named = set(re.findall(r"[\w.-]+\.md\b", _text()))
    assert named - shipped == set(), (
        f"README names documents not in the repository: {named - shipped}"
    )


def _resolve(dotted: str):
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        with contextlib.suppress(ImportError):
            obj = importlib.import_module(".".join(parts[:k]))
            for attr in parts[k:]:
                obj = getattr(obj, attr)
            return obj
    raise ImportError(dotted)


def test_quoted_api_names_exist():
    """`v4jax.x.y` / `sharding.z` quoted in the prose import (file names such as
    `v4jax.json` excepted)."""
    pattern = re.compile(r"((?:v4jax|sharding)(?:\.\w+)+)")
    names = {
        m.group(1)
        for q in _quoted()
        if (m := pattern.match(q)) and not re.fullmatch(r"[\w.]+\.(json|md|py|sh)", q)
    }
    assert len(names) >= 5, names
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"README quotes names that do not exist: {missing}"
