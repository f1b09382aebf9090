"""Official parity of the decode path on `v4-tiny-flash` (reference numerics): teacher-forced
per-step logits (prefill P, then one token per call, as the official run) and greedy
continuations. A step may flip top-1 only where the golden top-1/top-2 margin is smaller than
our logit error there (fixture README)."""

from __future__ import annotations

import numpy as np
import pytest

import v4jax


def _teacher_forced(model, tokens, prefix):
    cache = model.init_cache(1, 512)
    logits, cache = model.prefill(tokens[None, :prefix], cache)
    rows = [np.asarray(logits)[0]]
    for i in range(prefix, tokens.shape[0]):
        logits, cache = model.decode_step(tokens[i : i + 1], cache)
        rows.append(np.asarray(logits)[0])
    return np.stack(rows)


def _margin(logits):
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def test_teacher_forced_short_prefix(ref_model, golden):
    got = _teacher_forced(ref_model, golden["tf_P003_K024_tokens"], 3)
    want = golden["tf_P003_K024_logits"]
    diff = np.abs(got - want)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert diff.mean() <= 1e-3  # measured 1.6e-4: most steps are bit-identical
    assert diff.max() <= 0.05


def test_teacher_forced_long_prefix(ref_model, golden):
    got = _teacher_forced(ref_model, golden["tf_P150_K024_tokens"], 150)
    want = golden["tf_P150_K024_logits"]
    err = np.abs(got - want).max(-1)
    flips = got.argmax(-1) != want.argmax(-1)
    assert not (flips & (_margin(want) > err)).any()
    # Max 0.8: since the quantised linears and grouped experts multiply bf16 operands with
    # float32 accumulation (exact products, another summation order), one step of this
    # 150-token prefix moved from <= 0.6 to 0.77 (FP8 activation rounding amplifies last-bit
    # differences at single positions); the mean (0.039 measured) keeps its 0.06 bound and no
    # top-1 flip is allowed where the golden margin exceeds our error.
    assert err.max() <= 0.8 and np.abs(got - want).mean() <= 0.06


def test_batch_of_two(ref_model, golden):
    tokens = golden["b2_tokens"]
    cache = ref_model.init_cache(2, 64)
    logits, cache = ref_model.prefill(tokens[:, :40], cache)
    rows = [np.asarray(logits)]
    for i in range(40, 48):
        logits, cache = ref_model.decode_step(tokens[:, i], cache)
        rows.append(np.asarray(logits))
    got, want = np.stack(rows), golden["b2_logits"]
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert np.abs(got - want).mean() <= 0.06


@pytest.mark.parametrize("length", ["001", "005", "037", "200", "300"])
def test_greedy_continuations(ref_model, golden, length):
    prompt = golden[f"p{length}_tokens"].tolist()
    got = v4jax.generate(ref_model, [prompt], max_new_tokens=16, eos_id=-1).tokens[0]
    want = golden[f"p{length}_greedy_tokens"]
    margin = golden[f"p{length}_greedy_top2_margin"]
    differ = np.nonzero(got != want)[0]
    if differ.size:  # allowed only at a step whose margin is within our prefill error (0.26)
        assert margin[differ[0]] <= 0.26, (differ[0], margin[differ[0]])
    if length in ("001", "005", "037"):  # short prefills: no flip at all
        assert differ.size == 0
