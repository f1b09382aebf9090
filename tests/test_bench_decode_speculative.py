"""scripts/bench_decode.py --section speculative (issue 15 section 1): the section's whole code
path on the bundled tiny checkpoint at minimal sizes, checked for the JSON's structure and its
internal consistency (quantities recomputed here from the raw counts it also writes; slow: four
whole-model compiles), plus the pieces that need no compile: prompt slicing, the greedy mismatch
report, argument refusals.

The tiny checkpoint's weights are random, so its MTP drafts are almost never accepted: the
acceptance figures are checked for consistency, not for size (that is the trained demo model's
job, reported by the benchmark itself)."""

import importlib.util
import json
import math
import pathlib
import types

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
K, STEPS, PROMPT = 2, 8, 16  # k = 2: two draft positions, so the rates' order is checked
# The run compiles the whole model four times (prefill, plain loop, speculative start and
# loop): 59 s on the 2-core machine when idle, 166 s while shared, so the tests that read its
# JSON are marked slow; the pieces after them need no compile (4 s).
SLOW = pytest.mark.slow


def _script():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "scripts/bench_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _script()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The JSON of one greedy run, B = 1, k = 2, float32 activations, written over a file that
    already holds another section (which must be kept)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    out.write_text(json.dumps({"meta": {}, "sections": {"fastpath": {"rows": ["kept"]}}}))
    argv = ["--section", "speculative", "--numerics", "bf16", "--dtype", "float32"]
    argv += ["--draft-tokens", str(K), "--batches", "1", "--temperatures", "0"]
    argv += ["--prompt-len", str(PROMPT), "--steps", str(STEPS), "--reps", "1"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


@SLOW
def test_json_structure_and_merge(report):
    assert report["sections"]["fastpath"] == {"rows": ["kept"]}
    sec = report["sections"]["speculative"]
    setup = sec["setup"]
    assert setup["numerics"] == "bf16" and setup["dtype"] == "float32"
    assert setup["draft_tokens"] == [K] and setup["temperatures"] == [0.0]
    # the default prompts: train.py's held-out stdlib modules, byte tokens for a 1024 vocab
    assert setup["prompts_held_out"] and setup["tokenizer"] == "bytes"
    assert [p["file"] for p in setup["prompts"]][0] in bench.stdlib_heldout()
    (row,) = sec["rows"]
    assert (row["temperature"], row["batch"], row["draft_tokens"]) == (0.0, 1, K)


@SLOW
def test_acceptance_counts_are_consistent(report):
    (row,) = report["sections"]["speculative"]["rows"]
    hist, steps = np.asarray(row["accept_hist"]), row["verify_steps"]
    assert hist.shape == (K + 1,) and hist.min() >= 0 and hist.sum() == steps
    # EOS is ignored: the verify steps emit every token after the prefill's first
    assert row["emitted"] == STEPS - 1
    # each verify step emits 1 .. k + 1 tokens
    assert math.ceil(row["emitted"] / (K + 1)) <= steps <= row["emitted"]
    rate = row["accept_rate"]
    assert len(rate) == K and all(0.0 <= r <= 1.0 for r in rate)
    # draft j is accepted only if drafts < j were: the rates cannot increase with j
    assert all(a >= b for a, b in zip(rate, rate[1:], strict=False))
    for j in range(1, K + 1):  # rate_j = steps that accepted >= j drafts / steps
        assert rate[j - 1] == pytest.approx(hist[j:].sum() / steps, abs=1e-12)
    # E[accepted] = sum over j of P(accepted >= j)
    assert row["mean_accepted"] == pytest.approx(sum(rate), abs=1e-12)
    # tokens per verify step = 1 + mean accepted drafts, less the tokens past --steps cut off
    cut = row["cut_at_max_new"]
    assert 0 <= cut <= K  # only the last step of a sequence is cut (at most k of k + 1 tokens)
    want = 1 + row["mean_accepted"] - cut / steps
    assert row["tokens_per_step"] == pytest.approx(want, abs=1e-12)
    assert row["tokens_per_step"] == pytest.approx(row["emitted"] / steps, abs=1e-12)
    assert row["drafts_emitted"] <= row["mean_accepted"] * steps


@SLOW
def test_timings_and_greedy_equality(report):
    (row,) = report["sections"]["speculative"]["rows"]
    plain, sp = row["plain"], row["spec"]
    assert plain["tokens_per_s"] == pytest.approx(STEPS / plain["seconds"], rel=1e-12)
    assert sp["tokens_per_s"] == pytest.approx(row["emitted"] / sp["seconds"], rel=1e-12)
    assert row["spec_over_plain"] == pytest.approx(sp["tokens_per_s"] / plain["tokens_per_s"])
    for part in (plain, sp):  # compile kept out of the timed calls, reported on its own
        assert part["compile_s"] >= 0 and part["setup_first_s"] > 0
    # bf16 numerics with float32 activations: speculative greedy == plain greedy, exactly
    assert row["same"] is True and row["mismatched_seqs"] == 0 and row["first_diff"] is None


def test_greedy_mismatch_is_reported():
    """A speculative output that differs from plain greedy is counted, with where it starts."""
    ref = np.arange(12, dtype=np.int32).reshape(3, 4)
    out = ref.copy()
    out[1, 2:] += 1  # sequence 1 diverges at token 2
    out[2, 3] += 1  # sequence 2 at token 3
    st = types.SimpleNamespace(
        accept_hist=np.array([[3, 0], [2, 1], [3, 0]]),
        verify_steps=np.array([3, 3, 3]),
        n=np.array([4, 4, 4]),
        accepted=np.array([0, 1, 0]),
        out=out,
    )
    plain = dict(seconds=1.0, tokens_per_s=12.0, compile_s=0.0)
    row = bench.spec_row(st, 1, 0.0, (2.0, 1.0), plain, ref)
    assert row["same"] is False and row["mismatched_seqs"] == 2 and row["first_diff"] == 2
    assert row["accept_rate"] == [1 / 9] and row["emitted"] == 9
    sampled = bench.spec_row(st, 1, 1.0, (2.0, 1.0), plain, None)
    assert "same" not in sampled  # sampling: no token-level comparison


class _Chars:
    """A tokenizer stand-in: one id per character."""

    def encode(self, text):
        return [ord(c) for c in text]


def test_prompt_slices(tmp_path):
    long_a, long_b, short = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    long_a.write_text("".join(chr(65 + i % 26) for i in range(100)))
    long_b.write_text("x" * 40)
    short.write_text("y" * 9)  # shorter than a prompt: skipped
    files = [str(long_a), str(short), str(long_b)]
    tokens, where = bench.text_prompts(files, _Chars(), 3, 10)
    assert tokens.shape == (3, 10)
    # prompts alternate over the long files; two slices of a at 1/3 and 2/3 of its range
    assert [w[0] for w in where] == [str(long_a), str(long_b), str(long_a)]
    assert [w[1] for w in where] == [30, 10, 60]
    assert tokens[0].tolist() == [65 + i % 26 for i in range(30, 40)]
    with pytest.raises(bench.BenchInputError, match="--prompt-len"):
        bench.text_prompts([str(short)], _Chars(), 1, 10)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--section", "prefix"], "not implemented yet"),
        (["--section", "speculative", "--steps", "1"], "needs >= 2"),
        (["--section", "speculative", "--temperatures", "0,-1"], "numbers >= 0"),
        (["--section", "speculative", "--draft-tokens", "0"], "integers >= 1"),
        (["--section", "speculative", "--prompts-file", "/nonexistent.txt"], "no such file"),
    ],
)
def test_bad_arguments_refused_in_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err.strip().splitlines()[-1]
