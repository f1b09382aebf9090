"""The lm-evaluation-harness backend (`v4jax.eval.harness`) on the bundled tiny checkpoint.

Offline: local task YAML files over local JSONL data (tests/data/harness/). Cross-checks
against the package's own evaluation and generation, computed independently here:
multiple choice vs `v4jax.eval.multiple_choice`, perplexity vs `v4jax.eval.perplexity`,
generate_until vs `v4jax.generate` cut at the same stops. The tiny model's vocabulary (1024)
is below the official tokenizer's, so texts are UTF-8 bytes (id = byte + 2), BOS first.

Shapes are shared on purpose: every scoring call is [4, 128] (batch_size=4, one bucket of 128)
and generation is [4, 112] + 16 steps, so the module compiles the model a few times only, and
the harness' scores equal the direct ones bitwise (for a fixed compiled shape a row's result does
not depend on the other rows: `v4jax/eval/scoring.py`). Runs that need their own compilations
(generation, the command line in a subprocess, the 8-device mesh) are marked slow; the
generation plumbing (batches, fillers, truncation, stops, thinking) is also checked without a
compilation, around a scripted `v4jax.generate`.
"""

import contextlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval is not importable (the eval extra)", exc_type=ImportError
)

import v4jax  # noqa: E402
from v4jax import eval as ev  # noqa: E402
from v4jax.eval import harness, harness_args  # noqa: E402
from v4jax.tokenizer import BOS, format_chat  # noqa: E402
from v4jax.train.data import ByteTokenizer  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "harness"
FIXTURE = REPO / "tests" / "data" / "v4-tiny-flash"
SIZES = dict(batch_size=4, max_length=128, buckets=128, max_gen_toks=16)
ARGS = dict(pretrained=str(FIXTURE), numerics="bf16", dtype="float32", **SIZES)
GEN_WIDTH = 128 - 16  # generation prompts are padded to max_length - max_gen_toks here


class _Bytes(ByteTokenizer):
    """The byte tokenizer with the batch method `v4jax.eval.load_items` calls."""

    def encode_batch(self, texts, *, add_bos=False):
        return [self.encode(t, add_bos=add_bos) for t in texts]


def _items():  # the multiple-choice task's data, read by v4jax.eval
    tok = _Bytes(vocab_size=1024)
    return ev.load_items(DATA / "mc.jsonl", vocab_size=1024, max_len=128, tokenizer=tok)


def _docs():  # the perplexity task's data, read by v4jax.eval
    return ev.load_documents(DATA / "ppl.jsonl", vocab_size=1024, tokenizer=_Bytes(vocab_size=1024))


@pytest.fixture(scope="module")
def model():
    return v4jax.load(FIXTURE, numerics="bf16", dtype=jnp.float32, progress=False)


@pytest.fixture(scope="module")
def lm(model):
    return harness.V4JaxLM(pretrained=model, **SIZES)


@pytest.fixture(scope="module")
def tasks():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(DATA), include_defaults=False)


@pytest.fixture(scope="module")
def scorer(model):
    return ev.Scorer(model, max_len=128, batch_size=4, buckets=(128,))


def _evaluate(model, tasks, task: str, **kw) -> tuple[dict, list[dict]]:
    with contextlib.chdir(REPO):  # the YAML data paths are relative to the repository
        out = lm_eval.simple_evaluate(
            model=model, tasks=[task], task_manager=tasks, log_samples=True, **kw
        )
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task], samples


def _logliks(samples) -> np.ndarray:
    """Every log-likelihood in logged samples: (ll, is_greedy) pairs or rolling sums."""
    firsts = [r[0] for s in samples for r in s["resps"]]
    return np.array([float(r[0] if isinstance(r, tuple | list) else r) for r in firsts])


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


# ---- registration and arguments (no compilation) ----


def test_registered_under_v4jax():
    from lm_eval.api.registry import get_model

    assert get_model("v4jax") is harness.V4JaxLM


def test_package_core_does_not_import_the_harness():
    code = "import v4jax, v4jax.eval, sys; print('lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "spec", ["data:2xtensor:4", "data:2,tensor:4", "data=2 x tensor=4", {"data": 2, "tensor": 4}]
)
def test_mesh_specs(spec):
    assert harness_args.parse_mesh(spec) == {"data": 2, "tensor": 4}


def test_model_args_string():
    """lm-eval's comma-joined model_args; the commas of a mesh spec stay with it."""
    got = harness_args.parse_model_args("pretrained=/m,mesh=data:2,tensor:4,batch_size=8")
    assert got == {"pretrained": "/m", "mesh": "data:2,tensor:4", "batch_size": 8}
    with pytest.raises(ValueError, match="'tensor' is not key=value"):
        harness_args.parse_model_args("pretrained=/m,tensor")
    assert harness_args.parse_buckets("64:256x1024") == (64, 256, 1024)


def test_model_args_win_over_lm_eval_defaults(model):
    lm = harness.V4JaxLM.create_from_arg_obj(
        {"pretrained": model, "batch_size": 4}, {"batch_size": 1, "device": None}
    )
    assert lm.batch_size == 4 and lm.scorer.batch_size == 4


def test_bad_arguments_are_one_line_errors(model):
    cases = [
        (dict(pretrained=model, batch_size="auto"), "batch_size='auto'"),
        (dict(pretrained=None), "pretrained=PATH is required"),
        (dict(pretrained=model, mesh="data:2"), "cannot be applied"),
        (dict(pretrained=str(FIXTURE), dtype="float16"), "dtype='float16'"),
        (dict(pretrained=model, max_gen_toks=0), "max_gen_toks=0"),
        (dict(pretrained=model, buckets="64;big"), "buckets='64;big'"),
        (dict(pretrained=str(FIXTURE), mesh="data:3"), "mesh"),
    ]
    for kwargs, text in cases:
        with pytest.raises(ValueError, match=re.escape(text)) as err:
            harness.V4JaxLM(**kwargs)
        assert "\n" not in str(err.value)


def test_byte_tokens_bos_first(lm):
    text = "Caf\u00e9 x"
    ids = [0, *(b + 2 for b in text.encode())]  # BOS, then byte + 2 (v4jax.train.data)
    assert lm.tok_encode(text) == ids
    assert lm.tok_encode(BOS + text) == ids  # a BOS already there is not doubled
    assert lm.tok_encode(text, add_special_tokens=False) == ids[1:]
    assert lm.tok_decode([*ids, 1, 900]) == text + "\ufffd"  # BOS / EOS dropped
    ctx, cont = lm._encode_pair("Answer: ", "yes")  # lm-eval: trailing spaces move right
    assert ctx == lm.tok_encode("Answer:") and cont == [b + 2 for b in b" yes"]


def test_official_tokenizer_for_the_full_vocabulary(tmp_path):
    """A model with the V4 vocabulary gets the official tokenizer: BOS + BPE ids, the context /
    continuation split of `v4jax.eval.load_items`, and chat prompts equal to `encode_chat`."""
    from v4jax.tokenizer import load_tokenizer

    full = v4jax.init(v4jax.config.tiny(vocab_size=129280), numerics="bf16", dtype=jnp.float32)
    lm = harness.V4JaxLM(pretrained=full, max_length=128)
    tok = load_tokenizer()
    assert lm.tokenizer_name == "deepseek-v4"
    assert lm.tok_encode("Caf\u00e9 au lait") == tok.encode("Caf\u00e9 au lait", add_bos=True)
    record = {"context": "Question: capital of France?\nAnswer: ", "choices": ["Paris", "Rome"]}
    (tmp_path / "mc.jsonl").write_text(json.dumps({**record, "answer": 0}) + "\n")
    (item,) = ev.load_items(tmp_path / "mc.jsonl", vocab_size=129280, max_len=128, tokenizer=tok)
    for choice, want in zip(record["choices"], item.choices, strict=True):
        ctx, cont = lm._encode_pair(record["context"], " " + choice)  # lm-eval's delimiter
        assert ctx == item.context.tolist() and cont == want.tolist()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert lm.tok_encode(lm.apply_chat_template(chat)) == tok.encode_chat(chat)
    ids = tok.encode("why</think> ok<\uff5cend\u2581of\u2581sentence\uff5c>", add_bos=True)
    assert lm.tok_decode(ids) == "why</think> ok"  # BOS / EOS dropped, </think> kept


def test_long_input_loses_tokens_on_the_left(lm):
    ctx, cont = list(range(3, 203)), [7, 8, 9]  # 203 tokens > max_length + 1 = 129
    r = lm._request(ctx, cont)
    assert r.continuation.tolist() == cont
    assert r.context.tolist() == ctx[-(129 - 3) :] and r.input_len == 128
    with pytest.raises(ValueError, match="does not fit in max_length=128"):
        lm._request([0], list(range(3, 200)))


def test_generation_batches_pad_to_a_bucket():
    lengths = [5, 40, 12, 64, 7]
    plan = harness_args.generation_batches(lengths, (16, 64, 112), batch_size=2)
    # longest first; 64 fills its bucket (2 prompts), the others leave a row for a filler
    assert plan == [([3, 1], 64), ([2], 16), ([4], 16), ([0], 16)]
    assert harness_args.generation_batches([5, 9], (16,), batch_size=1) == [([1], 9), ([0], 5)]


@pytest.mark.parametrize("thinking", [False, True])
def test_generate_until_batches_and_cuts(model, monkeypatch, thinking):
    """generate_until around a scripted `v4jax.generate` (no compilation): the batches it is
    given, and how the generated ids become the returned text."""
    from lm_eval.api.instance import Instance

    script = "why</think> four\n\nQ: next" if thinking else "four.\n\nQ: next"
    calls = []

    def fake_generate(_model, prompts, *, max_new_tokens, sampling, eos_id, max_len, prefix_cache):
        assert prefix_cache is None  # off unless model_args ask for it
        calls.append(([list(p) for p in prompts], max_new_tokens, sampling, eos_id, max_len))
        row = [*(b + 2 for b in script.encode()), 1, 0, 0]  # then EOS, then padding
        toks = np.array([row] * len(prompts), np.int32)
        lengths = np.full(len(prompts), len(row) - 2)  # up to and including EOS
        return v4jax.decode.Generation(toks, lengths, np.array([len(p) for p in prompts]))

    monkeypatch.setattr(v4jax, "generate", fake_generate)
    lm = harness.V4JaxLM(pretrained=model, thinking=thinking, seed=3, **SIZES)
    kw = {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": False}
    long = "x" * 300  # left-truncated to max_length - max_gen_toks = 112 tokens
    reqs = [Instance("generate_until", {}, (c, dict(kw)), i) for i, c in enumerate(["2+2=", long])]
    # reasoning (thinking) and EOS dropped, cut at the first stop
    assert lm.generate_until(reqs, disable_tqdm=True) == ["four" if thinking else "four."] * 2
    (prompts, steps, sampling, eos, max_len) = calls[0]
    assert (steps, eos, max_len) == (16, 1, 128) and sampling == v4jax.Sampling(seed=3)
    # one batch of batch_size rows: the longest prompt fills its bucket (112), so both
    # prompts go in and two fillers of that width complete the batch
    assert prompts[0] == [ord("x") + 2] * GEN_WIDTH  # truncated on the left: BOS gone
    assert prompts[1] == [0, *(b + 2 for b in b"2+2=")] and prompts[2:] == [[0] * GEN_WIDTH] * 2
    assert len(calls) == 1


@pytest.mark.parametrize("thinking", [False, True])
def test_chat_template_is_the_official_encoding(model, thinking):
    lm = harness.V4JaxLM(pretrained=model, thinking=thinking, **SIZES)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: 1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "Q: 2+2?"},
    ]
    assert lm.apply_chat_template(chat) == format_chat(chat, thinking=thinking)
    opened = lm.apply_chat_template([*chat, {"role": "assistant", "content": "A:"}], False)
    assert opened.startswith(BOS) and opened.endswith("A:")  # left open: no EOS after it
    assert lm.tok_encode(opened)[:2] == [0, ord("B") + 2]  # one BOS


# ---- the three request types against v4jax's own evaluation ----


def test_multiple_choice_equals_v4jax_eval(tasks, scorer):
    """Loaded by name from model_args, as `lm_eval --model v4jax` does."""
    res, samples = _evaluate("v4jax", tasks, "v4jax_tiny_mc", model_args=ARGS)
    want = ev.multiple_choice(scorer, _items())
    got = [tuple(float(r[0][0]) for r in s["resps"]) for s in samples]
    assert got == [it.logprobs for it in want.items]  # same compiled shape: bitwise equal
    assert res["acc,none"] == want.acc and res["acc_norm,none"] == want.acc_norm


def test_perplexity_equals_v4jax_eval(lm, tasks, scorer):
    res, samples = _evaluate(lm, tasks, "v4jax_tiny_ppl")
    docs = _docs()
    assert max(len(d.tokens) for d in docs) > 2 * 128  # several rolling windows
    want = ev.perplexity(scorer, docs)
    texts = [d["text"] for d in _jsonl("ppl.jsonl")]
    total = -math.fsum(float(s["resps"][0][0]) for s in samples)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    # per-document sums vs one sum over all windows: float64 rounding of ~10 terms
    assert total == pytest.approx(want.nll * want.num_tokens, rel=1e-12)
    assert res["bits_per_byte,none"] == pytest.approx(want.bits_per_byte, rel=1e-12)
    assert res["word_perplexity,none"] == pytest.approx(math.exp(total / words), rel=1e-12)


def test_chat_prompts_reach_the_model(lm, tasks):
    _, samples = _evaluate(
        lm, tasks, "v4jax_tiny_mc", apply_chat_template=True, system_instruction="Be brief."
    )
    doc = _jsonl("mc.jsonl")[0]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": doc["context"]}]
    assert samples[0]["arguments"][0][0] == format_chat(chat)


def _byte_text(ids) -> str:
    """The documented byte-mode reading of generated ids: BOS / EOS dropped, byte b + 2 -> b,
    an id past the byte range -> U+FFFD."""
    out, run = [], bytearray()
    for t in (t for t in ids if t > 1):
        if t < 258:
            run.append(t - 2)
        else:
            out += [run.decode("utf-8", errors="replace"), "\ufffd"]
            run = bytearray()
    return "".join([*out, run.decode("utf-8", errors="replace")])


def _plain_generation(model, prompts: list[str], stops: list[str]):
    """v4jax.generate on the byte prompts in the harness' batch (3 prompts + a filler row of the
    padded width, cache of max_length) -> (texts cut at the first stop, whole texts)."""
    ids = [[0, *(b + 2 for b in p.encode())] for p in prompts]
    out = v4jax.generate(model, [*ids, [0] * GEN_WIDTH], max_new_tokens=16, max_len=128)
    texts = [_byte_text(seq) for seq in out.sequences()[: len(prompts)]]
    cut = []
    for t in texts:
        for s in stops:
            t = t.split(s)[0]
        cut.append(t)
    return cut, texts


@pytest.mark.slow  # two model compilations (prefill + decode loop), ~45 s of CPU
def test_generate_until_equals_generate(model, lm, tasks):
    docs = _jsonl("gen.jsonl")
    prompts = [f"Q: {d['question']}\nA:" for d in docs]
    want, raw = _plain_generation(model, prompts, ["\n\n", "Q:"])
    _, samples = _evaluate(lm, tasks, "v4jax_tiny_gen")
    assert [s["resps"][0][0] for s in samples] == want
    # a stop that occurs: a piece of the middle of the first raw continuation
    assert len(raw[0]) >= 4, raw
    stop = raw[0][len(raw[0]) // 2 :][:2]
    want, _ = _plain_generation(model, prompts, [stop])
    _, samples = _evaluate(lm, tasks, "v4jax_tiny_gen", gen_kwargs={"until": [stop]})
    assert [s["resps"][0][0] for s in samples] == want and len(want[0]) < len(raw[0])


@pytest.mark.slow  # compiles prefill chunks and a decode loop at a new length
def test_generate_until_with_prefix_cache(model):
    """`prefix_cache=ram`: prompts sharing a 200-byte preamble (few-shot examples) reuse its
    first 128-token block from the second batch on, with the same text as without."""
    from lm_eval.api.instance import Instance

    sizes = dict(SIZES, max_length=272, buckets=256, batch_size=2)
    kw = {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": False}
    pre = "".join(f"Q: {i}+{i}=?\nA: {2 * i}\n\n" for i in range(20))[:200]
    ctx = [pre + f"Q: {q}\nA:" for q in ("red?", "blue?", "green?", "tea?")]
    reqs = [Instance("generate_until", {}, (c, dict(kw)), i) for i, c in enumerate(ctx)]
    plain = harness.V4JaxLM(pretrained=model, **sizes).generate_until(reqs, disable_tqdm=True)
    lm = harness.V4JaxLM(pretrained=model, prefix_cache="ram", **sizes)
    assert lm.generate_until(reqs, disable_tqdm=True) == plain
    # a batch is one prompt (~215 tokens) + one filler row of 256 BOS (the bucket width,
    # `generation_batches`); batch 1 stores the first 128-token block of both, and batches
    # 2-4 hit both (one block each: a prompt's last token is always prefilled)
    assert lm.stats["prefix_hit_tokens"] == 3 * 2 * 128


@pytest.mark.slow  # a fresh process: imports, lm-eval's task index, a model compilation
def test_command_line(tmp_path, tasks, scorer):
    args = ",".join(f"{k}={v}" for k, v in ARGS.items())
    cmd = [sys.executable, "-m", "v4jax.eval.harness", "--model", "v4jax", "--model_args", args]
    cmd += ["--tasks", "v4jax_tiny_mc,v4jax_tiny_ppl", "--include_path", str(DATA)]
    cmd += ["--output_path", str(tmp_path)]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = tmp_path.rglob("results_*.json")
    res = json.loads(path.read_text())["results"]
    assert res["v4jax_tiny_mc"]["acc,none"] == ev.multiple_choice(scorer, _items()).acc
    bpb = ev.perplexity(scorer, _docs()).bits_per_byte
    assert res["v4jax_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-12)


@pytest.mark.slow  # compiles the sharded model (scoring and generation) on 8 fake devices
def test_mesh_gives_the_single_device_results(lm, tasks):
    sharded = harness.V4JaxLM(**{**ARGS, "mesh": "data:2xtensor:4"})
    assert dict(sharded.model.mesh.shape) == {"data": 2, "tensor": 4}
    for task in ("v4jax_tiny_mc", "v4jax_tiny_ppl"):
        res, samples = _evaluate(sharded, tasks, task)
        base_res, base = _evaluate(lm, tasks, task)
        got, want = _logliks(samples), _logliks(base)
        # tensor-parallel matmuls sum in another order: float32 rounding of the logits
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
        if task == "v4jax_tiny_mc":
            assert res["acc,none"] == base_res["acc,none"]
    # greedy generation: the same tokens (rounding-level logit changes flip no argmax here)
    _, samples = _evaluate(sharded, tasks, "v4jax_tiny_gen")
    _, base = _evaluate(lm, tasks, "v4jax_tiny_gen")
    assert [s["resps"] for s in samples] == [s["resps"] for s in base]
