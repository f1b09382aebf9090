"""Official parity on the `v4-tiny-flash` golden fixture (its README: tolerances, noise probes).

Smooth mode (`numerics="bf16"`): the fixture's noise probes for correct variants reach ~0.025
max abs; the smallest listed bug (no_hadamard) is 0.018 only on long prompts, the others are
>= 0.17. We require <= 0.035 everywhere.
Reference mode: prompts of length <= 5 must be reproduced to ~1e-6 (fp32 head rounding); any
missing QAT step is off by ~0.1 there. Longer prompts: FP8 activation rounding amplifies
last-bit summation-order differences (see the README), so they are checked for top-1 and a
bound that still fails for the listed structural bugs on average (mean abs).
"""

import jax.numpy as jnp
import numpy as np
import pytest

PROMPTS = ["001", "005", "037", "200", "300"]


def _last(model, tokens):
    return np.asarray(model.logits(tokens[None]))[0, -1]


@pytest.mark.parametrize("length", PROMPTS)
def test_smooth_prefill(smooth_model, golden, length):
    got = _last(smooth_model, golden[f"p{length}_tokens"])
    want = golden[f"smooth_p{length}_prefill_logits"]
    assert np.abs(got - want).max() <= 0.035
    assert got.argmax() == want.argmax()


@pytest.mark.parametrize("length", ["001", "005"])
def test_reference_short_prompts_exact(ref_model, golden, length):
    got = _last(ref_model, golden[f"p{length}_tokens"])
    assert np.abs(got - golden[f"p{length}_prefill_logits"]).max() <= 1e-5


# HF transformers' mean abs error against the same golden logits (fixture README)
HF_MEAN = {"037": 0.0244, "200": 0.0290, "300": 0.0726}


@pytest.mark.parametrize("length", ["037", "200", "300"])
def test_reference_long_prompts(ref_model, golden, length):
    """Measured max / mean: 0.068 / 0.017, 0.123 / 0.024, 0.073 / 0.018."""
    got = _last(ref_model, golden[f"p{length}_tokens"])
    want = golden[f"p{length}_prefill_logits"]
    diff = np.abs(got - want)
    assert got.argmax() == want.argmax()
    assert diff.max() <= 0.15
    assert diff.mean() < HF_MEAN[length]


@pytest.mark.parametrize("name", ["tf_P003_K024", "tf_P150_K024"])
def test_smooth_teacher_forced_rows(smooth_model, golden, name):
    """The reference's decode logits equal fresh prefills of every prefix (fixture README), so
    they are our full-sequence logits at those positions."""
    got = np.asarray(smooth_model.logits(golden[f"{name}_tokens"][None]))[0]
    got = got[golden[f"{name}_positions"]]
    want = golden[f"smooth_{name}_logits"]
    # One P150 position reaches 0.40: a near-tie in a router's top-k resolves differently
    # (the fixture README sees the same for HF: positions at 0.17-0.57, max 0.35 here).
    assert np.abs(got - want).max() <= 0.45
    assert np.abs(got - want).mean() <= 0.011
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.96


def test_reference_first_prefix_rows_exact(ref_model, golden):
    """tf_P003 row 0 is the prefill of 3 tokens: exact when run at that length."""
    toks = golden["tf_P003_K024_tokens"]
    for n, row in [(3, 0), (5, 2)]:
        got = np.asarray(ref_model.logits(toks[None, :n]))[0, -1]
        assert np.abs(got - golden["tf_P003_K024_logits"][row]).max() <= 1e-5


def test_mtp_block(ref_model, golden):
    t = golden["mtp_tokens"]
    got = np.asarray(ref_model.mtp_logits(t[None, :37], t[None, 1:38]))[0, -1]
    want = golden["mtp_last_logits"]
    assert got.argmax() == want.argmax()
    assert np.abs(got - want).max() <= 0.15  # measured 0.086; same class as p037 (0.09)


def _decode_streams(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("mode", ["reference", "bf16"])
def test_each_block_from_golden_inputs(ref_model, smooth_model, golden, mode):
    """Feeding each block the golden input streams reproduces the golden output streams up to a
    handful of last-bit flips (a structural bug changes tens of thousands of elements)."""
    model = ref_model if mode == "reference" else smooth_model
    key = ("" if mode == "reference" else "smooth_") + "layers_p037_streams_bf16bits"
    streams = _decode_streams(golden[key])
    toks = jnp.asarray(golden["p037_tokens"][None])
    assert model.config.num_layers == 4
    for layer in range(model.config.num_layers):
        x = jnp.asarray(streams[layer][None]).astype(jnp.bfloat16)
        out = np.asarray(model.layer(layer)(x, toks)[0].astype(jnp.float32))
        diff = np.abs(out - streams[layer + 1])
        assert (diff > 0).sum() <= 6000, (layer, (diff > 0).sum())
        assert diff.max() <= 0.02, (layer, diff.max())
