"""The trainable form and the training losses where HF has no counterpart (the oracle parity
of the gradients is tests/test_train_grad.py).

- Quantisers: bit for bit the release recipe (`checkpoint.synthetic`), straight-through.
- Loss terms (cross-entropy, balance, indexer KL): float64 finite differences (jax x64) and
  values against direct loops over the paper's formulas.
- Stages: sparse (KL reaches only the indexer, LM / MTP / balance never reach it), dense
  warm-up (only the indexer gets a gradient); MTP wiring against `Model.mtp_logits`.
- Aux-loss-free bias update on a router made imbalanced on purpose; QAT export round trip.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax.checkpoint import names, synthetic
from v4jax.model.indexer import indexer_kl
from v4jax.model.moe import Router
from v4jax.numerics.policy import jit as numerics_jit
from v4jax.train import losses
from v4jax.train.model import (
    _flatten,
    _unflatten,
    fake_quant,
    quantize,
    release_named,
    to_model,
    trainable,
)

# CSA (hash-routed, index_topk 2 of 6 entries at 24 tokens) then window-only (scored routing)
# and the MTP block: every gradient path of the objective, compiled in seconds.
SMALL = v4jax.config.tiny(
    compress_ratios=(4, 0, 0), num_hash_layers=1, index_topk=2, index_heads=16
)
LENGTH = 24


@pytest.fixture(scope="module")
def small():
    model = v4jax.init(SMALL, seed=1, numerics="bf16", dtype=jnp.float32)
    tokens = np.random.default_rng(0).integers(2, SMALL.vocab_size, (2, LENGTH))
    tokens[:, 0] = 0
    mask = np.ones(tokens.shape, np.float32)
    mask[0, :5] = 0  # a prompt
    mask[1, 15:] = 0  # padding
    return model, trainable(model), jnp.asarray(tokens), jnp.asarray(mask)


# --------------------------------------------------------------------------- quantisers


def _edge_matrix(rng, shape):
    w = rng.normal(size=shape).astype(np.float32) * np.float32(2.0) ** rng.integers(-8, 8, shape)
    w[:3, :40] = 0.0  # an all-zero FP4 block and a partly zero FP8 block
    w[5, :32] = np.float32(0.75) * 2.0**-3  # e2m1 ties (0.75 -> 1.0 after scaling by 6/amax)
    w[6, :] = 448.0  # exactly the FP8 maximum: scale 2^0
    w[7, :64] = -1e-30  # tiny negatives: FP4 code 8 (-0), FP8 -0
    return w


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_quantize_is_the_release_recipe(fmt):
    rng = np.random.default_rng(5)
    w = np.stack([_edge_matrix(rng, (200, 160)) for _ in range(2)])  # [2, O, I], O % 128 != 0
    q, s = quantize(fmt, jnp.asarray(w))
    recipe = synthetic.quantize_fp8_blocks if fmt == "fp8" else synthetic.quantize_fp4_rows
    dequant = synthetic.dequantize_fp8_blocks if fmt == "fp8" else synthetic.dequantize_fp4
    for i in range(2):
        want_q, want_s = recipe(w[i])
        np.testing.assert_array_equal(np.asarray(q[i]).view(np.uint8), want_q.view(np.uint8))
        np.testing.assert_array_equal(np.asarray(s[i]).view(np.uint8), want_s.view(np.uint8))
        fake = np.asarray(_fake(fmt, jnp.asarray(w[i])))
        np.testing.assert_array_equal(fake, dequant(want_q, want_s))


@pytest.mark.parametrize("fmt", ["fp8", "fp4", "bf16"])
def test_fake_quant_gradient_is_straight_through(fmt):
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.normal(size=(130, 64)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(130, 64)), jnp.float32)
    loss = lambda w: jnp.sum(c * fake_quant(fmt, w, straight_through=True))
    g = numerics_jit(jax.grad(loss))(w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(c))
    assert not np.array_equal(np.asarray(_fake(fmt, w)), np.asarray(w))  # it does round


@functools.partial(numerics_jit, static_argnums=0)
def _fake(fmt, w):
    return fake_quant(fmt, w)


# --------------------------------------------------------------------------- loss terms


def _fd_check(fn, x, seed: int):
    """Directional derivative of scalar fn at x: jax.grad vs central differences (float64;
    step 1e-6: truncation ~1e-12 relative, rounding ~1e-10, tolerance 1e-7)."""
    v = np.random.default_rng(seed).normal(size=x.shape)
    g = float(jnp.vdot(jax.jit(jax.grad(fn))(x), v))
    h, fn = 1e-6, jax.jit(fn)
    fd = (float(fn(x + h * v)) - float(fn(x - h * v))) / (2 * h)
    assert abs(g - fd) <= 1e-7 * max(1.0, abs(fd)), (g, fd)


def test_cross_entropy_value_and_gradient():
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        logits = jnp.asarray(rng.normal(size=(2, 5, 11)))
        targets = jnp.asarray(rng.integers(0, 11, (2, 5)))
        weight = jnp.asarray(rng.integers(0, 2, (2, 5)).astype(np.float64))
        total, n = losses.cross_entropy(logits, targets, weight)
        lse = np.log(np.exp(np.asarray(logits)).sum(-1))
        nll = (
            lse - np.take_along_axis(np.asarray(logits), np.asarray(targets)[..., None], -1)[..., 0]
        )
        np.testing.assert_allclose(float(total), (nll * np.asarray(weight)).sum(), rtol=1e-12)
        assert float(n) == float(weight.sum())
        _fd_check(lambda x: losses.cross_entropy(x, targets, weight)[0], logits, 1)


def test_balance_term_value_and_gradient():
    with jax.enable_x64(True):
        rng = np.random.default_rng(8)
        scores = jnp.asarray(rng.uniform(0.1, 2.0, (3, 7, 6)))
        top = jnp.asarray(np.argsort(rng.normal(size=(3, 7, 6)), -1)[..., :2])
        counts, bal = Router.balance_stats(scores, top)
        s, t = np.asarray(scores), np.asarray(top)
        want = []
        for b in range(3):  # the paper's sums, term by term
            f = [6 / (2 * 7) * sum(i in t[b, j] for j in range(7)) for i in range(6)]
            p = [np.mean([s[b, j, i] / s[b, j].sum() for j in range(7)]) for i in range(6)]
            want.append(sum(fi * pi for fi, pi in zip(f, p, strict=True)))
        np.testing.assert_allclose(float(bal), np.mean(want), rtol=1e-12)
        np.testing.assert_array_equal(np.asarray(counts), np.bincount(t.ravel(), minlength=6))
        _fd_check(lambda x: Router.balance_stats(x, top)[1], scores, 2)


def test_indexer_kl_value_and_gradient():
    with jax.enable_x64(True):
        rng = np.random.default_rng(9)
        mass = jnp.asarray(rng.uniform(0, 1, (2, 4, 5)))
        logits = jnp.asarray(rng.normal(size=(2, 4, 5)))
        valid = jnp.asarray(rng.uniform(size=(2, 4, 5)) < 0.7).at[0, 0].set(False)
        total, n = indexer_kl(mass, logits, valid)
        want, count = 0.0, 0
        for b, t in np.ndindex(2, 4):
            v = np.asarray(valid[b, t])
            if not v.any():
                continue
            p = np.asarray(mass[b, t])[v] / np.asarray(mass[b, t])[v].sum()
            lg = np.asarray(logits[b, t])[v]
            q = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
            want, count = want + np.sum(p * np.log(p / q)), count + 1
        np.testing.assert_allclose(float(total), want, rtol=1e-12)
        assert float(n) == count
        _fd_check(lambda x: indexer_kl(mass, x, valid)[0], logits, 3)
        # KL(p || p) = 0: logits = log p
        assert abs(float(indexer_kl(mass, jnp.log(mass), valid)[0])) < 1e-12


# --------------------------------------------------------------------------- names, round trips


def test_release_named_inverts_locate(small):
    model, tm, *_ = small
    named = release_named(tm.params)
    specs = synthetic.release_tensor_specs(SMALL)
    untrained = {n for n in specs if n.endswith((".scale", "gate.bias", "tid2eid"))}
    assert set(named) == set(specs) - untrained
    params = _flatten(tm.params)
    for name, a in named.items():
        dtype, shape = specs[name]
        want = (shape[0], shape[1] * 2) if dtype == "I8" else tuple(shape)
        assert a.shape == want, name
        path, idx = names.locate(name, SMALL)
        assert np.array_equal(np.asarray(params[tuple(path)][idx]), np.asarray(a)), name


def test_to_model_round_trips_the_masters(small):
    model, tm, *_ = small
    again = trainable(to_model(tm))
    a, b = _flatten(tm.params), _flatten(again.params)
    assert a.keys() == b.keys()
    assert all(np.array_equal(np.asarray(a[p]), np.asarray(b[p])) for p in a)
    assert to_model(tm).precision == tm.precision


def test_bad_inputs(small):
    _, tm, tokens, mask = small
    with pytest.raises(ValueError, match="mask"):
        losses.value_and_grad(tm, tokens, mask[:, :-1])
    with pytest.raises(ValueError, match="ids must be in"):
        losses.value_and_grad(tm, tokens.at[0, 3].set(SMALL.vocab_size))
    with pytest.raises(ValueError, match="indexer_weight > 0"):
        losses.value_and_grad(tm, tokens, indexer_stage="dense")
    with pytest.raises(ValueError, match="indexer_stage"):
        losses.value_and_grad(tm, tokens, indexer_weight=1.0, indexer_stage="warm")


# --------------------------------------------------------------------------- stages and terms

TERMS = ("lm", "mtp", "balance", "indexer_kl")


@numerics_jit
def _terms(tm, tokens, mask):
    """Sparse stage: the four unweighted terms and each one's gradient (a vjp per term)."""

    def terms(params):
        kw = dict(mtp_weight=1.0, balance_weight=1.0, indexer_weight=1.0)
        _, met = losses.loss(tm.replace(params=params), tokens, mask, **kw)
        return jnp.stack([met[t] for t in TERMS])

    values, vjp = jax.vjp(terms, tm.params)
    return values, jax.vmap(lambda ct: vjp(ct)[0])(jnp.eye(len(TERMS), dtype=jnp.float32))


@pytest.fixture(scope="module")
def sparse(small):
    _, tm, tokens, mask = small
    values, grads = _terms(tm, tokens, mask)
    return {
        t: (float(values[i]), _flatten(jax.tree.map(lambda g, i=i: g[i], grads)))
        for i, t in enumerate(TERMS)
    }


def _nonzero(grads: dict) -> set:
    return {p for p, g in grads.items() if np.any(np.asarray(g))}


def test_sparse_stage_keeps_the_indexer_and_the_model_apart(sparse):
    indexer = {p for p in sparse["lm"][1] if "indexer" in p}
    assert indexer and _nonzero(sparse["indexer_kl"][1]) == indexer
    for term in ("lm", "mtp", "balance"):
        assert not _nonzero(sparse[term][1]) & indexer, term
    mtp_own = {p for p in sparse["lm"][1] if p[0] == "mtp"}
    assert not _nonzero(sparse["lm"][1]) & mtp_own  # the LM loss does not use the MTP block
    mtp = _nonzero(sparse["mtp"][1])  # the MTP loss trains the block and the main stack
    assert mtp_own - mtp == set() and ("segments", 0, "blocks", 0, "attn", "wq_a", "weight") in mtp
    assert ("head", "weight") not in _nonzero(sparse["balance"][1])  # after every router


@pytest.mark.slow  # its own compile of the full objective (~90 s here)
def test_value_and_grad_combines_the_terms(small, sparse):
    """Default weights (MTP 0.3, balance 1e-4, indexer off) = the weighted per-term gradients:
    turning the KL on changes nothing outside the indexer. The two sides add the same float32
    contributions in another order; the mHC scale gradients sum B*S*N terms of both signs, so
    allow 1e-4 relative (measured up to 1.5e-5)."""
    _, tm, tokens, mask = small
    loss, met, grads = losses.value_and_grad(tm, tokens, mask)
    w = {"lm": 1.0, "mtp": 0.3, "balance": 1e-4}
    np.testing.assert_allclose(float(loss), sum(w[t] * sparse[t][0] for t in w), rtol=1e-6)
    for t in w:
        np.testing.assert_allclose(float(met[t]), sparse[t][0], rtol=1e-6)
    for p, g in _flatten(grads).items():
        want = sum(w[t] * np.asarray(sparse[t][1][p]) for t in w)
        err = np.linalg.norm(np.asarray(g) - want) / max(np.linalg.norm(want), 1e-30)
        assert err <= 1e-4 or not np.any(want) and not np.any(g), (p, err)


def test_dense_stage_trains_only_the_indexer(small, sparse):
    _, tm, tokens, mask = small
    loss, met, grads = losses.value_and_grad(
        tm, tokens, mask, indexer_weight=2.0, indexer_stage="dense"
    )
    assert float(loss) == pytest.approx(2.0 * float(met["indexer_kl"]), rel=1e-6)
    grads = _flatten(grads)
    assert _nonzero(grads) == {p for p in grads if "indexer" in p}
    # dense attention: every visible entry (6 at the end), not the indexer's top 2
    assert abs(float(met["lm"]) - sparse["lm"][0]) > 1e-4


def test_mtp_predicts_two_tokens_ahead(small, sparse):
    model, _, tokens, mask = small
    logits = np.asarray(model.mtp_logits(tokens[:, :-1], tokens[:, 1:]), np.float64)[:, :-1]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    tgt = np.asarray(tokens[:, 2:])
    nll = lse - np.take_along_axis(logits, tgt[..., None], -1)[..., 0]
    w = np.asarray(mask[:, 1:-1]) * np.asarray(mask[:, 2:])  # i + 1 and i + 2 both targets
    np.testing.assert_allclose(sparse["mtp"][0], (nll * w).sum() / w.sum(), rtol=1e-5)


# --------------------------------------------------------------------------- router bias


@numerics_jit
def _counts(tm, tokens):
    return losses.loss(tm, tokens)[1]["expert_counts"]


def test_router_bias_update_balances_load(small):
    _, tm, tokens, _ = small
    frozen = jax.tree.map(lambda a: a, tm.frozen)
    scored = [k for k in _counts(tm, tokens) if "bias" in _gate(frozen, k)]
    hashed = [k for k in _counts(tm, tokens) if k not in scored]
    assert scored and hashed
    for k in scored:  # experts 0 and 1 win every token
        _gate(frozen, k)["bias"] = _gate(frozen, k)["bias"].at[..., :2].add(0.2)
    ratio = lambda c: float(np.max(c) / np.mean(c))
    first = _counts(tm.replace(frozen=frozen), tokens)
    for _ in range(25):
        counts = _counts(tm.replace(frozen=frozen), tokens)
        new = losses.update_router_bias(frozen, counts, rate=0.01)
        for k in scored:  # b_i += rate * sign(mean load - load_i)
            load = np.asarray(counts[k])
            step = np.asarray(_gate(new, k)["bias"] - _gate(frozen, k)["bias"])
            want = 0.01 * np.sign(load.mean(-1, keepdims=True) - load)
            np.testing.assert_allclose(step, want, atol=1e-6)
        for k in hashed:  # hash routing depends on the token ids only
            np.testing.assert_array_equal(np.asarray(counts[k]), np.asarray(first[k]))
            assert _gate(new, k) == _gate(frozen, k)
        frozen = new
    last = _counts(tm.replace(frozen=frozen), tokens)
    for k in scored:
        assert ratio(first[k]) >= 2.0 and ratio(last[k]) < 0.6 * ratio(first[k]), k


def _gate(frozen: dict, key: str) -> dict:
    node = frozen
    for part in key.split("."):
        node = node[int(part) if part.isdigit() else part]
    return node["ffn"]["gate"]


# --------------------------------------------------------------------------- QAT


@pytest.fixture(scope="module")
def qat(small):
    """A QAT model whose masters moved off the release grid (as after an optimizer step)."""
    _, _, tokens, _ = small
    tm = trainable(v4jax.init(SMALL, seed=2), qat=True)
    rng = np.random.default_rng(4)
    params = {
        p: a * (1 + 0.02 * rng.standard_normal(a.shape, np.float32))
        for p, a in _flatten(tm.params).items()
    }
    return tm.replace(params=_unflatten({p: jnp.asarray(a) for p, a in params.items()})), tokens


def test_qat_export_is_what_training_ran(qat, tmp_path):
    tm, tokens = qat
    trained = np.asarray(tm.logits(tokens))
    v4jax.export_hf(to_model(tm), tmp_path / "release")
    loaded = v4jax.load(tmp_path / "release", numerics="reference", progress=False)
    np.testing.assert_array_equal(np.asarray(loaded.logits(tokens)), trained)


@pytest.fixture(scope="module")
def qat_grads(qat):
    tm, tokens = qat
    return _flatten(losses.value_and_grad(tm, tokens)[2])


@pytest.mark.slow  # two compiles of the reference-numerics objective (~5 min here)
def test_qat_gradient_is_straight_through(qat, qat_grads):
    """d loss / d master = d loss / d (the release-format weight it becomes): the same
    reference forward fed the fake-quantised weights directly gives the same gradient."""
    tm, tokens = qat
    fmt = dict(tm.formats)
    q = {p: _fake(fmt[p], a) for p, a in _flatten(tm.params).items()}
    _, _, g_weight = losses.value_and_grad(tm.replace(qat=False, params=_unflatten(q)), tokens)
    b = _flatten(g_weight)
    assert all(np.array_equal(np.asarray(qat_grads[p]), np.asarray(b[p])) for p in b)
    assert any(np.any(np.asarray(qat_grads[p])) for p in b)


@pytest.mark.slow
def test_qat_gradient_follows_the_float32_gradient(qat, qat_grads):
    """QAT's gradient is the float32 model's at the quantised weights, up to the forward's FP8
    activation rounding: every tensor's gradient within 30 degrees (measured with
    straight-through activation quantisers: cos >= 0.965; without them many are exactly 0)."""
    tm, tokens = qat
    f32 = trainable(to_model(tm, numerics="bf16", dtype=jnp.float32))
    ref = _flatten(losses.value_and_grad(f32, tokens)[2])
    for p, r in ref.items():
        g, r = np.asarray(qat_grads[p]), np.asarray(r)
        if np.any(r):
            cos = np.vdot(g, r) / (np.linalg.norm(g) * np.linalg.norm(r) + 1e-30)
            assert cos > np.cos(np.pi / 6), (p, cos)
