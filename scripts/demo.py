"""The end-to-end demo (no downloads): the bundled tiny checkpoint in the official release
format -> Orbax -> load -> agreement with the official logits -> prefill + greedy generation ->
a short evaluation -> export back to the release format, checked byte for byte.

    .venv/bin/python scripts/demo.py [--fixture DIR] [--workdir DIR]

Without --workdir it works in a temporary folder that is removed at the end (also on an error or
Ctrl-C); with --workdir the converted and exported checkpoints are kept there. The fixture and
the work folder are checked before anything runs: a bad one is one `error: ...` line, exit 2.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

import v4jax
from v4jax import cli
from v4jax.checkpoint.convert import hf_to_orbax, orbax_to_hf
from v4jax.checkpoint.errors import CheckpointError
from v4jax.checkpoint.orbax_io import Kind, detect
from v4jax.checkpoint.safetensors import ShardedCheckpoint
from v4jax.config import ConfigError
from v4jax.eval import Document, Scorer, passkey, perplexity

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "v4-tiny-flash"


def step(title: str) -> None:
    print(f"\n== {title}")


def same_release(a: pathlib.Path, b: pathlib.Path) -> tuple[int, int]:
    """(tensors compared, tensors whose name, dtype, shape or bytes differ)."""
    with ShardedCheckpoint(a) as x, ShardedCheckpoint(b) as y:
        names = sorted(x.keys())
        bad = sum(
            n not in y or x.info(n) != y.info(n) or x.get(n).tobytes() != y.get(n).tobytes()
            for n in names
        )
        return len(names), bad + len(set(y.keys()) - set(names))


def check_args(ap: cli.Parser, a: argparse.Namespace) -> None:
    """--fixture must be a release folder with the official logits; --workdir a folder (made)."""
    if detect(a.fixture) is not Kind.RELEASE or not (a.fixture / "golden.npz").is_file():
        ap.fail(
            f"--fixture {a.fixture}: not a release folder with golden.npz (the official "
            "logits), like tests/data/v4-tiny-flash"
        )
    if a.workdir is not None:
        if a.workdir.exists() and not a.workdir.is_dir():
            ap.fail(f"--workdir {a.workdir}: is a file, not a folder")
        try:
            a.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            ap.fail(f"--workdir {a.workdir}: cannot create it ({e.strerror})")


def main(argv: list[str] | None = None) -> int:
    ap = cli.Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", type=pathlib.Path, default=FIXTURE)
    ap.add_argument("--workdir", type=pathlib.Path, default=None, help="keep the outputs here")
    a = ap.parse_args(argv)
    check_args(ap, a)
    try:
        if a.workdir is not None:
            run(a.fixture, a.workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="v4jax-demo-") as tmp:
                run(a.fixture, pathlib.Path(tmp))
    except (CheckpointError, ConfigError) as e:  # e.g. a damaged fixture
        return cli.report(e)
    return 0


def run(fixture: pathlib.Path, work: pathlib.Path) -> None:
    golden = dict(np.load(fixture / "golden.npz"))
    print(f"jax {jax.__version__} on {jax.default_backend()}; working in {work}")

    step("convert the release folder to Orbax")
    conv = hf_to_orbax(fixture, work / "orbax", overwrite=True)
    print(
        f"{conv.tensors} tensors, {conv.nbytes / 1e6:.1f} MB in {conv.seconds:.2f} s "
        f"-> {work / 'orbax'} (release formats kept: FP8 / packed FP4 + E8M0 scales)"
    )

    step("load it (numerics='reference') and compare with the official logits")
    model = v4jax.load(work / "orbax", numerics="reference", progress=False)
    for length in ("005", "037"):
        got = np.asarray(model.logits(golden[f"p{length}_tokens"][None]))[0, -1]
        want = golden[f"p{length}_prefill_logits"]
        top1 = "agrees" if got.argmax() == want.argmax() else "differs"
        diff = np.abs(got - want).max()
        print(f"prompt of {int(length)} tokens: max |ours - official| = {diff:.2g}, top-1 {top1}")

    step("prefill + greedy generation (jax.lax.while_loop)")
    prompt = golden["p037_tokens"].tolist()
    v4jax.generate(model, [prompt], max_new_tokens=16, eos_id=-1)  # compile
    t0 = time.perf_counter()
    gen = v4jax.generate(model, [prompt], max_new_tokens=16, eos_id=-1)
    dt = time.perf_counter() - t0
    match = gen.tokens[0].tolist() == golden["p037_greedy_tokens"].tolist()
    print(f"16 tokens in {dt:.2f} s ({16 / dt:.0f} tok/s, batch 1, CPU): {gen.tokens[0].tolist()}")
    print(f"official greedy continuation: {'identical' if match else 'differs'}")

    step("short evaluation")
    scorer = Scorer(model, max_len=512, batch_size=1)
    ppl = perplexity(scorer, [Document(golden["p300_tokens"])])
    print(
        f"perplexity of the 300-token prompt: {ppl.perplexity:.1f} "
        f"(nll {ppl.nll:.3f} over {ppl.num_tokens} tokens; random weights, vocab 1024)"
    )
    pk = passkey(scorer, context_len=128, num_samples=2, num_candidates=3)
    print(
        f"passkey retrieval at {pk.context_len} tokens ({pk.num_samples} samples): greedy "
        f"accuracy {pk.greedy_accuracy:.2f}, best-of-{pk.num_candidates} accuracy "
        f"{pk.candidate_accuracy:.2f} (random weights: chance level is expected)"
    )

    step("export back to the release format")
    orbax_to_hf(work / "orbax", work / "release", overwrite=True)
    n, bad = same_release(fixture, work / "release")
    print(f"{n} tensors compared with the original: {bad} differ in name, dtype, shape or bytes")


if __name__ == "__main__":
    sys.exit(main())
