"""Every command-line tool refuses bad input early and clearly (issue 14, section 3).

A bad flag, file or size: exit status != 0, exactly one line on stderr naming the flag (or the
file, or the config key), no traceback, and no model loaded or program compiled first. Most
cases call each script's `main(argv)` in this process (the same code path as the command, much
faster than a new interpreter), with `v4jax.load` / `v4jax.init` replaced by a function that
fails the test and a counter of XLA compilations; a few run as real subprocesses to show the
whole command, interpreter start to exit status.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

import v4jax

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "v4-tiny-flash"
_compiles = [0]
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: (
        _compiles.__setitem__(0, _compiles[0] + 1)
        if event == "/jax/core/compile/backend_compile_duration"
        else None
    )
)


class ModelLoaded(Exception):
    """Raised by the stand-ins of v4jax.load / v4jax.init: validation came too late."""


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"cli_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def scripts():
    names = ["generate", "evaluate", "plan", "demo", "convert", "fixture_parity"]
    names += ["bench_moe", "bench_attention", "bench_flops", "bench_convert"]
    return {n: _script(n) for n in names}


@pytest.fixture()
def no_model(monkeypatch):
    def loaded(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(v4jax, "load", loaded)
    monkeypatch.setattr(v4jax, "init", loaded)


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "ppl.jsonl").write_text('{"tokens": [1, 2, 3]}\n')
    (tmp_path / "bad.jsonl").write_text('{"tokens": [1, 2, 3]}\n{"tokens": [3,\n')
    (tmp_path / "mc.jsonl").write_text(
        '{"context_tokens": [1, 2, 3], "choices_tokens": [[4], [5, 6]], "answer": 1}\n'
    )
    (tmp_path / "a_file").write_text("x")
    bad_cfg = tmp_path / "bad_cfg"
    bad_cfg.mkdir()
    cfg = json.loads((FIXTURE / "config.json").read_text())
    del cfg["hidden_size"]
    (bad_cfg / "config.json").write_text(json.dumps(cfg))
    (bad_cfg / "model.safetensors").write_bytes(b"")
    return tmp_path


def _refused(script, argv: list[str], capsys, *needles: str) -> str:
    """Runs main(argv): refused with one stderr line naming the needles, nothing compiled."""
    c0 = _compiles[0]
    try:
        rc = script.main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc not in (0, None), (argv, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert _compiles[0] == c0, f"{argv}: compiled before refusing"
    return lines[0]


GENERATE = [
    (["--tokens", ""], "--tokens"),
    (["--tokens", " , "], "--tokens"),
    (["--tokens", "1,x"], "--tokens"),
    (["--tokens", "1,-2"], "--tokens"),
    (["--tokens", "5000"], "--tokens"),
    (["--tokens", "1,2", "-n", "0"], "-n must be >= 1"),
    (["--tokens", "1,2", "-n", "-5"], "-n must be >= 1"),
    (["--tokens", "1", "-n", "3000"], "-n"),
    (["--tokens", "1,2", "-n", "4", "--max-len", "3"], "--max-len"),
    (["--tokens", "1", "--max-len", "0"], "--max-len"),
    (["--tokens", "1", "--temperature", "-1"], "--temperature"),
    (["--tokens", "1", "--top-k", "-1"], "--top-k"),
    (["--tokens", "1", "--top-k", "5000"], "--top-k"),
    (["--tokens", "1", "--top-p", "0"], "--top-p"),
    (["--tokens", "1", "--top-p", "1.5"], "--top-p"),
    (["--tokens", "1", "--system", "be brief"], "--system"),
    (["--prompt", "hi", "--thinking"], "--thinking"),
    (["--chat", "hello"], "--chat"),  # the V4 tokenizer's ids do not fit a 1024-token vocab
    (["--tokens", "1", "-n", "x"], "-n"),
    (["--tokens", "1", "--prompt", "x"], "--prompt"),
    (["--tokens", "1", "--numerics", "fp4"], "--numerics"),
    (["--messages", "/nonexistent/chat.json"], "--messages"),
    (["--tokens", "1", "--tools", "/nonexistent/tools.json"], "--tools"),
    (["--prompt", "hi", "--reasoning-effort", "max"], "--reasoning-effort"),
    (["--chat", "hi", "--reasoning-effort", "low"], "--reasoning-effort"),
    (["--tokens", "1", "--draft-tokens", "2"], "--draft-tokens"),
    (["--tokens", "1", "--speculative", "mtp", "--draft-tokens", "0"], "--draft-tokens"),
    (["--tokens", "1", "--speculative", "medusa"], "--speculative"),
]


@pytest.mark.parametrize(
    "content, flag, message",
    [
        ("{", "--messages", "not a UTF-8 JSON file"),
        ('{"tools": []}', "--messages", "non-empty list of messages"),
        ('[{"role": "user", "content": "hi"}, {"role": "wizard"}]', "--messages", "messages[1]"),
        # a valid tool conversation: the encoding works, the tiny vocabulary then refuses it
        (
            '{"messages": [{"role": "user", "content": "Weather?"}], "tools": [{"type": '
            '"function", "function": {"name": "w", "description": "d", "parameters": {}}}]}',
            "--messages",
            "vocabulary",
        ),
    ],
)
def test_generate_messages_file(scripts, no_model, capsys, tmp_path, content, flag, message):
    path = tmp_path / "chat.json"
    path.write_text(content)
    argv = ["--checkpoint", "tiny-random", "--messages", str(path)]
    _refused(scripts["generate"], argv, capsys, message)


@pytest.mark.parametrize("argv, flag", GENERATE)
def test_generate(scripts, no_model, capsys, argv, flag):
    _refused(scripts["generate"], ["--checkpoint", "tiny-random", *argv], capsys, flag)


def test_generate_checkpoints(scripts, no_model, capsys, files):
    gen = scripts["generate"]
    _refused(gen, ["--tokens", "1"], capsys, "--checkpoint")
    _refused(gen, ["--checkpoint", str(files / "nope"), "--tokens", "1"], capsys, "--checkpoint")
    bad = files / "bad_cfg"
    _refused(
        gen, ["--checkpoint", str(bad), "--tokens", "1"], capsys, "--checkpoint", "hidden_size"
    )
    ev = scripts["evaluate"]
    _refused(ev, ["passkey", "--checkpoint", str(bad)], capsys, "--checkpoint", "hidden_size")
    _refused(gen, ["--checkpoint", str(FIXTURE), "--tokens", "1,2", "-n", "0"], capsys, "-n")


def _eval(files, task: str, *argv: str) -> list[str]:
    data = {"perplexity": ["--data", str(files / "ppl.jsonl")], "passkey": []}
    return [task, "--checkpoint", "tiny-random", *data.get(task, []), *argv]


EVALUATE = [
    (["perplexity", "--checkpoint", "tiny-random"], "--data"),
    (["multiple-choice", "--checkpoint", "tiny-random"], "--data"),
    (["perplexity", "--checkpoint", "tiny-random", "--data", "{}/nope.jsonl"], "nope.jsonl"),
    (["perplexity", "--checkpoint", "tiny-random", "--data", "{}/bad.jsonl"], "bad.jsonl:2"),
    (["passkey", "--checkpoint", "tiny-random", "--data", "{}/ppl.jsonl"], "--data"),
    (["multiple-choice", "--checkpoint", "tiny-random", "--data", "{}/mc.jsonl", "--max-len",
      "3"], "mc.jsonl:1"),
    (["perplexity", "--batch-size", "0"], "--batch-size"),
    (["perplexity", "--max-len", "0"], "--max-len"),
    (["perplexity", "--max-len", "5000"], "--max-len"),
    (["perplexity", "--stride", "0"], "--stride"),
    (["perplexity", "--max-len", "64", "--stride", "65"], "--stride"),
    (["perplexity", "--buckets", "0"], "--buckets"),
    (["perplexity", "--buckets", "x"], "--buckets"),
    (["perplexity", "--max-len", "64", "--buckets", "128"], "--buckets"),
    (["perplexity", "--context-len", "64"], "--context-len"),
    (["passkey", "--stride", "4"], "--stride"),
    (["passkey", "--samples", "0"], "--samples"),
    (["passkey", "--candidates", "0"], "--candidates"),
    (["passkey", "--candidates", "100000"], "--candidates"),
    (["passkey", "--context-len", "0"], "--context-len"),
    (["passkey", "--context-len", "64", "5000"], "--context-len"),
    (["passkey", "--context-len", "10"], "--context-len"),  # shorter than one sample
    (["perplexity", "--output", "{}"], "--output"),  # a directory
    (["perplexity", "--output", "{}/a_file/r.json"], "--output"),
    (["perplexity", "--numerics", "int4"], "--numerics"),
    (["bogus"], "task"),
]  # fmt: skip


@pytest.mark.parametrize("argv, flag", EVALUATE)
def test_evaluate(scripts, no_model, capsys, files, argv, flag):
    argv = [a.replace("{}", str(files)) for a in argv]
    if "--checkpoint" not in argv and argv[0] != "bogus":
        argv = _eval(files, argv[0], *argv[1:])
    _refused(scripts["evaluate"], argv, capsys, flag)


def test_evaluate_bad_tokenizer(scripts, no_model, capsys, files):
    """With the V4 vocabulary the tokenizer is loaded (and checked) before the model."""
    folder = files / "v4_vocab"
    folder.mkdir()
    cfg = v4jax.config.to_dict(v4jax.config.small())  # 129,280 ids, like the release
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(b"")
    argv = ["passkey", "--checkpoint", str(folder), "--tokenizer", str(files / "nope.json")]
    _refused(scripts["evaluate"], argv, capsys, "--tokenizer", "nope.json")
    argv[-1] = str(files / "a_file")  # not a tokenizer.json: tokenizers raises Exception
    _refused(scripts["evaluate"], argv, capsys, "--tokenizer", "a_file")


def test_evaluate_prepares_output_before_loading(scripts, no_model, files):
    """A missing --output folder is created before the model loads (the results used to be
    lost after scoring), and the data is read before it too."""
    out = files / "new" / "deeper" / "results.json"
    with pytest.raises(ModelLoaded):
        scripts["evaluate"].main(_eval(files, "perplexity", "--output", str(out)))
    assert out.parent.is_dir() and not out.exists()


PLAN = [
    (["--mesh", "banana=8"], "--mesh"),
    (["--mesh", "expert=0"], "--mesh"),
    (["--mesh", "expert"], "--mesh"),
    (["--mesh", ""], "--mesh"),
    (["--context", "0"], "--context"),
    (["--batch", "0"], "--batch"),
    (["--seq", "-1"], "--seq"),
    (["--hbm-gb", "0"], "--hbm-gb"),
    (["--reserve", "1"], "--reserve"),
    (["--model", "llama"], "--model"),
]


@pytest.mark.parametrize("argv, flag", PLAN)
def test_plan(scripts, capsys, monkeypatch, argv, flag):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored afterwards
    _refused(scripts["plan"], argv, capsys, flag)


def test_convert(scripts, capsys, files):
    conv, dst = scripts["convert"], str(files / "out")
    _refused(conv, ["hf-to-orbax", str(files / "nope"), dst], capsys, "nope")
    _refused(conv, ["hf-to-orbax", str(FIXTURE), dst, "--dtype", "fp8"], capsys, "--dtype")
    _refused(conv, ["hf-to-orbax", str(FIXTURE)], capsys, "dst")
    _refused(conv, ["frobnicate", "a", "b"], capsys, "frobnicate")
    _refused(conv, [], capsys, "command")
    _refused(conv, ["orbax-to-hf", str(FIXTURE), dst], capsys, "not a v4jax Orbax")
    _refused(conv, ["hf-to-orbax", str(files / "bad_cfg"), dst], capsys, "hidden_size")
    _refused(conv, ["hf-to-orbax", str(FIXTURE), str(files / "a_file" / "o")], capsys, "a_file")
    assert not (files / "out").exists()


def test_demo_and_fixture_parity(scripts, no_model, capsys, files):
    for name, out_flag in (("demo", "--workdir"), ("fixture_parity", "--json")):
        s = scripts[name]
        _refused(s, ["--fixture", str(files / "nope")], capsys, "--fixture")
        _refused(s, ["--fixture", str(files / "bad_cfg")], capsys, "--fixture")
        _refused(s, [out_flag, str(files / "a_file" / "x")], capsys, out_flag)
    _refused(scripts["fixture_parity"], ["--json", str(files)], capsys, "--json")


BENCH = [
    ("bench_moe", ["--dim", "100"], "--dim"),
    ("bench_moe", ["--inter", "0"], "--inter"),
    ("bench_moe", ["--experts", "2"], "--experts"),
    ("bench_moe", ["--tokens", "0"], "--tokens"),
    ("bench_moe", ["--reps", "0"], "--reps"),
    ("bench_moe", ["--out", "{}"], "--out"),
    ("bench_attention", ["--batch", "0"], "--batch"),
    ("bench_attention", ["--reps", "0"], "--reps"),
    ("bench_attention", ["--only", "no-such-shape"], "--only"),
    ("bench_attention", ["--json", "{}"], "--json"),
    ("bench_flops", ["--tokens", "0"], "--tokens"),
    ("bench_flops", ["--context", "-1"], "--context"),
    ("bench_flops", ["--impl", "magic"], "--impl"),
    ("bench_flops", ["--out", "{}/a_file/x.json"], "--out"),
    ("bench_convert", ["--work", "{}/nope"], "--work"),
    ("bench_convert", ["--json", "{}"], "--json"),
]


@pytest.mark.parametrize("name, argv, flag", BENCH)
def test_bench(scripts, capsys, files, name, argv, flag):
    _refused(scripts[name], [a.replace("{}", str(files)) for a in argv], capsys, flag)


def test_truncated_checkpoint_is_one_line(scripts, capsys, tmp_path):
    """A truncated v4jax Orbax checkpoint: one line from generate, no thread tracebacks."""
    from v4jax.checkpoint.convert import hf_to_orbax

    hf_to_orbax(FIXTURE, tmp_path / "orbax")
    data = max((tmp_path / "orbax" / "state" / "d").iterdir(), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    argv = ["--checkpoint", str(tmp_path / "orbax"), "--tokens", "1,2"]
    _refused(scripts["generate"], argv, capsys, "truncated", data.name)


def test_commands_in_subprocesses():
    """The real commands, started together (each pays its own interpreter and jax import)."""
    cases = [
        (["generate.py", "--checkpoint", "tiny-random", "--tokens", ""], "--tokens"),
        (["plan.py", "--mesh", "banana=8"], "--mesh"),
        (["evaluate.py", "passkey", "--checkpoint", "tiny-random", "--samples", "0"], "--samples"),
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / argv[0]), *argv[1:]],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv, _ in cases
    ]
    for p, (argv, flag) in zip(procs, cases, strict=True):
        out, err = p.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert p.returncode == 2, (argv, err)
        assert len(lines) == 1 and flag in lines[0] and "Traceback" not in err, (argv, err)


def test_cli_module(capsys, tmp_path):
    """v4jax.cli on its own: the hint with and without the program's name, output_file's three
    outcomes (created, a folder given, an uncreatable folder), report's first line."""
    from v4jax import cli

    def refusal(parse) -> str:
        with pytest.raises(SystemExit) as e:
            parse()
        assert e.value.code == 2
        return capsys.readouterr().err

    ap = cli.Parser(prog="tool")
    ap.add_argument("--n", type=int)
    err = refusal(lambda: ap.parse_args(["--n", "x"]))
    assert err == "error: argument --n: invalid int value: 'x' (see --help)\n"
    assert refusal(lambda: ap.fail("--n is odd")) == "error: --n is odd\n"
    top = cli.Parser(prog="tool", prog_in_hint=True)
    sub = top.add_subparsers(dest="cmd", required=True)
    sub.add_parser("go", prog_in_hint=True).add_argument("src")
    err = refusal(lambda: top.parse_args(["go"]))
    assert err == "error: the following arguments are required: src (see tool go --help)\n"

    assert cli.output_file("--out", None) is None
    out = tmp_path / "new" / "deeper" / "r.json"
    assert cli.output_file("--out", str(out)) == out
    assert out.parent.is_dir() and not out.exists()  # the folder now, the file after the work
    err = refusal(lambda: cli.output_file("--out", tmp_path))
    assert err == f"error: --out {tmp_path} is a directory: give a file name\n"
    (tmp_path / "a_file").write_text("x")
    err = refusal(lambda: cli.output_file("--json", tmp_path / "a_file" / "sub" / "r.json"))
    assert err.startswith(f"error: --json {tmp_path}/a_file/sub/r.json: cannot create its folder")
    assert err.count("\n") == 1

    assert cli.report(ValueError("head: 2 problems:\n  one\n  two")) == 2
    assert capsys.readouterr().err == "error: head: 2 problems:\n"
