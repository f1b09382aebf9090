"""Invariants in float32 (`numerics="bf16", dtype=float32`): causality, jit == eager, batch
composition, and bf16 vs float32 closeness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax

# window 16, ratios 4 and 128: S = 140 crosses the window, many ratio-4 blocks and one
# ratio-128 block; index_topk 3 < the number of entries.
CFG = v4jax.config.tiny(index_topk=3)


@pytest.fixture(scope="module")
def model():
    return v4jax.init(CFG, seed=3, numerics="bf16", dtype=jnp.float32)


def _tokens(b, s, seed):
    t = np.random.default_rng(seed).integers(2, CFG.vocab_size, (b, s)).astype(np.int32)
    t[:, 0] = 0
    return t


def test_causality_across_block_boundaries(model):
    s = 140
    toks = _tokens(1, s, 0)
    base = np.asarray(model.logits(toks))
    for cut in (3, 4, 127, 128, 129):  # change everything from `cut` on
        changed = toks.copy()
        changed[:, cut:] = _tokens(1, s - cut, cut + 1)
        got = np.asarray(model.logits(changed))
        np.testing.assert_array_equal(got[:, :cut], base[:, :cut])
        assert not np.array_equal(got[:, cut:], base[:, cut:])


def test_jit_equals_eager(model):
    toks = jnp.asarray(_tokens(2, 21, 1))
    jitted = np.asarray(model.logits(toks))
    with jax.disable_jit():
        eager = np.asarray(model.module(toks))
    np.testing.assert_allclose(eager, jitted, rtol=0, atol=1e-5 * np.abs(jitted).max())


def test_batch_rows_are_independent(model):
    toks = _tokens(3, 23, 2)
    together = np.asarray(model.logits(toks))
    for i in range(3):
        alone = np.asarray(model.logits(toks[i : i + 1]))[0]
        np.testing.assert_allclose(alone, together[i], rtol=0, atol=1e-5 * np.abs(alone).max())


def test_bf16_mode_tracks_float32(model):
    """bf16 activations vs float32 on the same weights: a few bf16 ulps through 4 blocks."""
    bf16 = v4jax.init(CFG, seed=3, numerics="bf16")
    toks = _tokens(1, 40, 4)
    a, b = np.asarray(model.logits(toks)), np.asarray(bf16.logits(toks))
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()


def test_reference_mode_differs_from_smooth_by_quant_noise():
    ref = v4jax.init(CFG, seed=3, numerics="reference")
    smooth = v4jax.init(CFG, seed=3, numerics="bf16")
    toks = _tokens(1, 9, 5)
    a, b = np.asarray(ref.logits(toks)), np.asarray(smooth.logits(toks))
    assert 0 < np.abs(a - b).max() <= 0.1 * np.abs(a).max()


def test_bad_tokens_are_rejected(model):
    with pytest.raises(ValueError, match="ids must be in"):
        model.logits(np.array([[0, CFG.vocab_size]]))
    with pytest.raises(ValueError, match="integer array"):
        model.logits(np.zeros((3,), np.int32))
    with pytest.raises(ValueError, match="integer array"):
        model.logits(np.zeros((1, 3), np.float32))


def test_bad_modes_are_rejected():
    with pytest.raises(ValueError, match="numerics='fp8'"):
        v4jax.init(CFG, numerics="fp8")
    with pytest.raises(ValueError, match="only valid with numerics='bf16'"):
        v4jax.init(CFG, numerics="reference", dtype=jnp.float32)
    with pytest.raises(ValueError, match="kernels="):
        v4jax.init(CFG, kernels="triton")
