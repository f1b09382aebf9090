"""Evaluation harness (`v4jax.eval`) on a tiny float32 model: log-likelihoods against a direct
computation from `model.logits`, invariance to batch size / buckets / padding, one compilation
per bucket, the tasks, file errors naming the line, and the command line."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax import eval as ev
from v4jax.eval.scoring import Loglik
from v4jax.tokenizer import load_tokenizer

CFG = v4jax.config.tiny()  # every layer type: window, CSA (ratio 4), HCA (ratio 128), hash
V = CFG.vocab_size
REPO = pathlib.Path(__file__).resolve().parents[1]

# Between different compiled shapes (batch size, bucket) XLA's CPU code generation rounds
# fused reductions differently (scoring.py docstring): scores agree to float32 rounding.
RTOL = 1e-6


@pytest.fixture(scope="module")
def model():
    return v4jax.init(CFG, seed=0, numerics="bf16", dtype=jnp.float32)


def _requests(n: int, seed: int) -> list[ev.Request]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ctx = rng.integers(3, V, rng.integers(1, 26))
        ctx[0] = 0
        out.append(ev.Request(ctx, rng.integers(3, V, rng.integers(1, 16))))
    return out


def _log_softmax(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _padded_logits(model, seqs) -> np.ndarray:
    """model.logits of up to 32 sequences of up to 64 tokens, right-padded into one [32, 64]
    call (one compilation for the whole module; causality makes the padding harmless)."""
    toks = np.zeros((32, 64), np.int32)
    for i, s in enumerate(seqs):
        toks[i, : len(s)] = s
    return np.asarray(model.logits(toks))[: len(seqs)]


def _direct(model, requests):
    """Summed log-probs and greedy flags straight from model.logits."""
    seqs = [np.concatenate([r.context, r.continuation]) for r in requests]
    logits = _padded_logits(model, [s[:-1] for s in seqs])
    lp = _log_softmax(logits)
    sums, greedy = [], []
    for i, (r, s) in enumerate(zip(requests, seqs, strict=True)):
        pos = np.arange(len(r.context) - 1, len(s) - 1)
        sums.append(lp[i, pos, s[pos + 1]].sum())
        greedy.append(bool(np.all(logits[i, pos].argmax(-1) == s[pos + 1])))
    return np.array(sums), greedy


def _logprobs(scores) -> np.ndarray:
    return np.array([s.logprob for s in scores])


def test_loglikelihood_matches_direct_computation(model):
    reqs = _requests(20, 0)
    scores = ev.Scorer(model, max_len=64, batch_size=8, buckets=(16, 32)).loglikelihood(reqs)
    want, greedy = _direct(model, reqs)
    np.testing.assert_allclose(_logprobs(scores), want, rtol=RTOL, atol=0)
    assert [s.num_tokens for s in scores] == [len(r.continuation) for r in reqs]
    assert [s.greedy for s in scores] == greedy


def test_batch_size_buckets_and_padding_do_not_change_scores(model):
    reqs = _requests(20, 0)
    base = _logprobs(ev.Scorer(model, max_len=64, batch_size=8).loglikelihood(reqs))
    one = _logprobs(ev.Scorer(model, max_len=64, batch_size=1).loglikelihood(reqs))
    buckets = ev.Scorer(model, max_len=64, batch_size=8, buckets=(16, 32))
    other = _logprobs(buckets.loglikelihood(reqs))
    np.testing.assert_allclose(one, base, rtol=RTOL, atol=0)
    np.testing.assert_allclose(other, base, rtol=RTOL, atol=0)
    # within one compiled shape: bitwise, whatever the order, the other rows and the padding
    shuffled = [reqs[i] for i in np.random.default_rng(1).permutation(len(reqs))]
    mixed = shuffled[:5] + _requests(9, 2)
    again = ev.Scorer(model, max_len=64, batch_size=8, buckets=(64,))
    got = _logprobs(again.loglikelihood(mixed))[:5]
    assert again.stats.shapes == {(8, 64)}
    where = {id(r): i for i, r in enumerate(reqs)}
    np.testing.assert_array_equal(got, base[[where[id(r)] for r in shuffled[:5]]])


def test_sharded_model_scores_the_same(model):
    """A model placed on a (data 2, tensor 4) mesh of the 8 fake CPU devices."""
    pytest.importorskip("sharding")  # the sharding issue's package
    mesh = jax.make_mesh((2, 4), ("data", "tensor"))
    sharded = v4jax.init(CFG, seed=0, numerics="bf16", dtype=jnp.float32, mesh=mesh)
    reqs = _requests(20, 0)
    base = _logprobs(ev.Scorer(model, max_len=64, batch_size=8).loglikelihood(reqs))
    got = _logprobs(ev.Scorer(sharded, max_len=64, batch_size=8).loglikelihood(reqs))
    np.testing.assert_allclose(got, base, rtol=RTOL, atol=0)


def test_step_compiles_once_per_bucket(model):
    scorer = ev.Scorer(model, max_len=48, batch_size=4, buckets=(24,))  # shapes of no other test
    s = scorer.stats
    reqs = _requests(40, 3)
    short = [r for r in reqs if r.input_len <= 24]
    scorer.loglikelihood(short)  # several batches, one bucket
    assert s.shapes == {(4, 24)} and s.batches >= 3 and s.step_traces == 1
    per_bucket = s.compilations  # the forward, the scoring step, the forward's input checks
    assert per_bucket >= 2
    scorer.loglikelihood(reqs)  # both buckets: only the new one compiles, as much as the first
    assert s.shapes == {(4, 24), (4, 48)} and s.step_traces == 2
    assert s.compilations == 2 * per_bucket
    scorer.loglikelihood(_requests(17, 4))  # new requests, same buckets: nothing compiles
    assert (s.step_traces, s.compilations) == (2, 2 * per_bucket)
    assert s.tokens == sum(r.input_len for r in short + reqs + _requests(17, 4))


def test_requests_are_checked(model):
    scorer = ev.Scorer(model, max_len=16)
    with pytest.raises(ValueError, match="do not fit in max_len=16"):
        scorer.loglikelihood([ev.Request([0] * 10, [5] * 8)])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 1024\)"):
        scorer.loglikelihood([ev.Request([0], [V])])
    with pytest.raises(ValueError, match="non-empty"):
        ev.Request([], [1])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ev.Scorer(model, max_len=CFG.max_position_embeddings + 1)
    assert ev.Scorer(model).buckets == (64, 128, 256, 512, 1024)  # capped by the model's 1024


def _write_jsonl(path: pathlib.Path, records) -> pathlib.Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_multiple_choice_with_known_answers(model, tmp_path):
    """Single-token choices: the model's own greedy token vs two others. Items 0-5 name the
    greedy token as the answer, items 6-9 another one: acc is 0.6 by construction."""
    rng = np.random.default_rng(5)
    ctxs = [np.concatenate([[0], rng.integers(3, V, 5 + i % 4)]) for i in range(10)]
    logits = _padded_logits(model, ctxs)
    greedy = [int(logits[i, len(c) - 1].argmax()) for i, c in enumerate(ctxs)]
    records = []
    for i, (c, g) in enumerate(zip(ctxs, greedy, strict=True)):
        others = [t for t in rng.permutation(np.arange(3, V))[:3].tolist() if t != g][:2]
        choices = [[t] for t in others[:1] + [g] + others[1:]]  # the greedy token at index 1
        answer = 1 if i < 6 else (0 if i % 2 else 2)
        records.append({"context_tokens": c.tolist(), "choices_tokens": choices, "answer": answer})
    records.insert(3, "")  # blank lines are skipped, line numbers still count them
    path = _write_jsonl(tmp_path / "mc.jsonl", records)
    items = ev.load_items(path, vocab_size=V, max_len=64)
    assert [it.line for it in items] == [1, 2, 3, 5, 6, 7, 8, 9, 10, 11]
    res = ev.multiple_choice(ev.Scorer(model, max_len=64, batch_size=8), items)
    assert (res.num_items, res.acc, res.acc_norm, res.normalization) == (10, 0.6, 0.6, "tokens")
    assert res.acc_stderr == pytest.approx(math.sqrt(0.6 * 0.4 / 9))
    assert [s.pred for s in res.items] == [1] * 10


def test_multiple_choice_acc_norm_follows_lengths(model):
    """Choices of 1-3 tokens: acc / acc_norm are the argmax of the direct log-likelihoods,
    raw and divided by the token counts."""
    rng = np.random.default_rng(6)
    items = []
    for i in range(8):
        ctx = np.concatenate([[0], rng.integers(3, V, 6)]).astype(np.int32)
        choices = tuple(rng.integers(3, V, k).astype(np.int32) for k in (1, 2, 3))
        items.append(ev.ChoiceItem(ctx, choices, i % 3, (1, 2, 3), "tokens"))
    res = ev.multiple_choice(ev.Scorer(model, max_len=64, batch_size=8), items)
    lp, _ = _direct(model, [ev.Request(it.context, c) for it in items for c in it.choices])
    lp = lp.reshape(8, 3)
    want_acc = np.mean(lp.argmax(1) == np.arange(8) % 3)
    want_norm = np.mean((lp / [1, 2, 3]).argmax(1) == np.arange(8) % 3)
    assert (res.acc, res.acc_norm) == (want_acc, want_norm)


BAD_MC = [
    (
        [{"context_tokens": [0, 1], "choices_tokens": [[2]], "answer": 0}, {"context_tokens": [0]}],
        r"mc.jsonl:2: missing field 'choices_tokens'",
    ),
    ([{"context_tokens": [0, 1], "choices_tokens": [[2]]}], r":1: missing field 'answer'"),
    (
        ["", {"context_tokens": [0], "choices_tokens": [], "answer": 0}],
        r":2: 'choices_tokens' is empty",
    ),
    (
        [{"context_tokens": [0], "choices_tokens": [[1], []], "answer": 0}],
        r":1: choices_tokens\[1\] is empty",
    ),
    (
        [{"context_tokens": list(range(20)), "choices_tokens": [[1]], "answer": 0}],
        r":1: context \(20 tokens\) \+ choice 0 \(1 tokens\) do not fit in max_len 16",
    ),
    (
        [{"context_tokens": [0], "choices_tokens": [[1]], "answer": 1}],
        r":1: answer 1 is not a choice index in \[0, 1\)",
    ),
    (
        [{"context_tokens": [0], "choices_tokens": [[1]], "answer": True}],
        r":1: field 'answer' must be an integer, got a boolean",
    ),
    (
        [{"context_tokens": [0, 5000], "choices_tokens": [[1]], "answer": 0}],
        r":1: 'context_tokens' has ids in \[0, 5000\], outside the model's vocabulary",
    ),
    ([{"context": "Q?", "choices": ["a"], "answer": 0}], r":1: text records need the V4"),
    (
        [{"context": "Q?", "choices": ["a", ""], "answer": 0}],
        r":1: choices\[1\] must be a non-empty string",
    ),
    (
        [{"context_tokens": [0], "choices_tokens": [[1]], "answer": 0}, "{nope"],
        r":2: not valid JSON",
    ),
    (["[1, 2]"], r":1: expected a JSON object, got list"),
]


@pytest.mark.parametrize("records,message", BAD_MC)
def test_bad_multiple_choice_files_name_the_line(tmp_path, records, message):
    path = _write_jsonl(tmp_path / "mc.jsonl", records)
    with pytest.raises(ev.DataError, match=message):
        ev.load_items(path, vocab_size=V, max_len=16)


@pytest.mark.parametrize(
    "records,message",
    [
        ([{"tokens": [0, 1]}, {"txt": "x"}], r":2: missing field 'text' \(or 'tokens'\)"),
        ([{"tokens": [0]}], r":1: 'tokens' needs at least 2 ids"),
        ([{"tokens": "0 1"}], r":1: 'tokens' must be a list of integer token ids"),
        ([{"text": "hello"}], r":1: text records need the V4 tokenizer"),
    ],
)
def test_bad_perplexity_files_name_the_line(tmp_path, records, message):
    path = _write_jsonl(tmp_path / "ppl.jsonl", records)
    with pytest.raises(ev.DataError, match=message):
        ev.load_documents(path, vocab_size=V)


def test_rolling_windows_predict_every_token_once():
    for n, max_len, stride in [(2, 8, 8), (9, 8, 8), (100, 32, 32), (100, 32, 7), (33, 32, 1)]:
        windows = ev.rolling_windows(n, max_len, stride)
        predicted = np.concatenate([np.arange(a, e) for _, a, e in windows])
        np.testing.assert_array_equal(predicted, np.arange(1, n))
        for k, (w, a, e) in enumerate(windows):
            assert e - 1 - w <= max_len and w < a  # input fits, context non-empty
            if k:  # later windows keep max_len - stride + 1 tokens of context (more at the end)
                assert a - w >= max_len - stride + 1
    with pytest.raises(ValueError, match="stride=0"):
        ev.rolling_windows(10, 8, 0)


def test_perplexity_of_a_tokens_file(model, tmp_path):
    rng = np.random.default_rng(7)
    docs = [np.concatenate([[0], rng.integers(3, V, n)]) for n in (1, 8, 40, 63)]
    path = _write_jsonl(tmp_path / "ppl.jsonl", [{"tokens": d.tolist()} for d in docs])
    loaded = ev.load_documents(path, vocab_size=V)
    whole = ev.perplexity(ev.Scorer(model, max_len=64, batch_size=8), loaded)
    lp, _ = _direct(model, [ev.Request(d[:1], d[1:]) for d in docs])
    n = sum(len(d) - 1 for d in docs)
    assert (whole.num_tokens, whole.num_documents, whole.bits_per_byte) == (n, 4, None)
    assert whole.nll == pytest.approx(-lp.sum() / n, rel=RTOL)
    assert whole.perplexity == pytest.approx(math.exp(-lp.sum() / n), rel=RTOL)
    # documents longer than max_len: sliding windows, each window checked against model.logits
    windowed = ev.Scorer(model, max_len=32, batch_size=8, buckets=(16,))
    got = [ev.perplexity(windowed, loaded, stride=s) for s in (32, 16)]
    reqs = [
        [ev.Request(d[w:a], d[a:e]) for d in docs for w, a, e in ev.rolling_windows(len(d), 32, s)]
        for s in (32, 16)
    ]
    lp, _ = _direct(model, reqs[0] + reqs[1])
    for res, stride, want in zip(got, (32, 16), np.split(lp, [len(reqs[0])]), strict=True):
        assert (res.num_tokens, res.stride, res.max_len) == (n, stride, 32)
        assert res.nll == pytest.approx(-want.sum() / n, rel=RTOL)


def test_passkey_runs_at_two_context_lengths(model):
    scorer = ev.Scorer(model, max_len=64, batch_size=8, buckets=(16, 32))
    for n in (24, 56):  # beyond the 16-token window, several ratio-4 entries
        res = ev.passkey(scorer, context_len=n, num_samples=3, num_candidates=4, seed=n)
        assert (res.context_len, res.num_samples, res.mode) == (n, 3, "tokens")
        assert [s.depth for s in res.samples] == [0.0, 0.5, 1.0]
        assert 0 <= res.greedy_accuracy <= 1 and 0 <= res.candidate_accuracy <= 1
        assert np.isfinite(res.mean_logprob) and res.mean_logprob < 0
    assert scorer.stats.shapes == {(8, 32), (8, 64)}
    with pytest.raises(ValueError, match="more than max_len=64"):
        ev.passkey(scorer, context_len=62)
    with pytest.raises(ValueError, match="too short, the sample needs 16"):
        ev.passkey(scorer, context_len=15)


class _Recorder:
    """Stands in for a Scorer: records requests, 1 bit per continuation token."""

    def __init__(self, max_len=4096, vocab_size=129280):
        self.max_len, self.vocab_size, self.requests = max_len, vocab_size, []

    def loglikelihood(self, requests, *, progress=None):
        self.requests += requests
        return [
            Loglik(-math.log(2) * len(r.continuation), len(r.continuation), False) for r in requests
        ]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_text_passkey_samples(tok):
    rec = _Recorder()
    res = ev.passkey(rec, context_len=300, num_samples=2, num_candidates=3, tokenizer=tok)
    assert res.mode == "text" and len(rec.requests) == 6
    for s, r in zip(res.samples, rec.requests[::3], strict=True):
        assert len(r.context) == 300 and r.context[0] == tok.bos_id
        text = tok.decode(r.context)
        assert f"The pass key is {s.key}. Remember it." in text
        assert text.endswith("What is the pass key? The pass key is")
        assert tok.decode(r.continuation) == f" {s.key}"


def test_text_items_and_documents(tok, tmp_path):
    ctx = "Question: 2 + 2 =\nAnswer: "  # trailing space moves to the continuation (lm-eval)
    mc = _write_jsonl(
        tmp_path / "mc.jsonl", [{"context": ctx, "choices": ["4", "fünf"], "answer": 0}]
    )
    (item,) = ev.load_items(mc, vocab_size=tok.vocab_size, max_len=64, tokenizer=tok)
    stem = tok.encode(ctx.rstrip(), add_bos=True)
    assert item.context.tolist() == stem and item.unit == "bytes"
    for c, ids in zip(["4", "fünf"], item.choices, strict=True):
        assert ids.tolist() == tok.encode(ctx.rstrip() + "  " + c, add_bos=True)[len(stem) :]
    assert item.lengths == (1, 5)
    text = "Hello wörld. 你好!"
    docs = _write_jsonl(tmp_path / "d.jsonl", [{"text": text}, {"text": text + text}])
    loaded = ev.load_documents(docs, vocab_size=tok.vocab_size, tokenizer=tok)
    (plain,) = ev.load_documents(
        _write_jsonl(tmp_path / "d.txt", [text]), vocab_size=tok.vocab_size, tokenizer=tok
    )
    assert loaded[0].tokens.tolist() == tok.encode(text, add_bos=True)
    assert plain.num_bytes == len(text.encode()) + 1  # the file's newline
    res = ev.perplexity(_Recorder(), loaded)
    nbytes = 3 * len(text.encode())
    assert res.num_bytes == nbytes and res.bits_per_byte == pytest.approx(res.num_tokens / nbytes)


def _evaluate(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def test_script_reports_bad_file_in_one_line(tmp_path):
    path = _write_jsonl(tmp_path / "mc.jsonl", BAD_MC[2][0])
    r = _evaluate("multiple-choice", "--checkpoint", "tiny-random", "--data", str(path))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {path}:2: 'choices_tokens' is empty"], (
        r.stderr
    )


def test_script_perplexity_json(model, tmp_path):
    rng = np.random.default_rng(8)
    docs = [[0, *rng.integers(3, V, n).tolist()] for n in (5, 40)]
    data = _write_jsonl(tmp_path / "ppl.jsonl", [{"tokens": d} for d in docs])
    out = tmp_path / "r.json"
    r = _evaluate(
        "perplexity",
        "--checkpoint",
        "tiny-random",
        "--data",
        str(data),
        "--max-len",
        "32",
        "--batch-size",
        "2",
        "--numerics",
        "bf16",
        "--dtype",
        "float32",
        "--output",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "tokens/s" in r.stdout
    rep = json.loads(out.read_text())
    res, st = rep["results"], rep["settings"]
    assert res["num_tokens"] == 45 and res["bits_per_byte"] is None
    assert res["perplexity"] == pytest.approx(math.exp(res["nll"]))
    assert (st["checkpoint"], st["numerics"], st["dtype"]) == ("tiny-random", "bf16", "float32")
    assert st["date"] and "git_commit" in st and st["compilations"] >= 1
    loaded = ev.load_documents(data, vocab_size=V)  # same weights in this process
    mine = ev.perplexity(ev.Scorer(model, max_len=32, batch_size=8, buckets=(16,)), loaded)
    assert mine.nll == pytest.approx(res["nll"], rel=RTOL)
