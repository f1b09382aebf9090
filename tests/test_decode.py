"""The decode loop against the full forward (float32 `"bf16"` mode: <= 1e-5 relative), chunked
prefill, batch invariance, cache persistence and memory accounting."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax.decode import Sampling, cache_bytes, load_cache, measured_bytes, save_cache

# window 16; ratio-4 and ratio-128 layers; index_topk 3 < entries; 140 tokens cross the
# window many times, 35 ratio-4 blocks and one ratio-128 block.
CFG = v4jax.config.tiny(index_topk=3)
LENGTH = 140
TOL = 1e-5  # float32 end to end: only summation order differs between the two paths


@pytest.fixture(scope="module")
def model():
    return v4jax.init(CFG, seed=5, numerics="bf16", dtype=jnp.float32)


@pytest.fixture(scope="module")
def seq():
    t = np.random.default_rng(0).integers(2, CFG.vocab_size, (1, LENGTH)).astype(np.int32)
    t[:, 0] = 0
    return t


@pytest.fixture(scope="module")
def full(model, seq):
    return np.asarray(model.logits(seq))[0]


def _close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert np.abs(got - want).max() <= TOL * np.abs(want).max()


@pytest.mark.parametrize("prefix", [0, 1, 3, 4, 5, 127, 128, 129])
def test_teacher_forced_decode_equals_forward(model, seq, full, prefix):
    cache = model.init_cache(1, 160)
    if prefix:
        logits, cache = model.prefill(seq[:, :prefix], cache)
        _close(logits[0], full[prefix - 1])
    for i in range(prefix, LENGTH):
        logits, cache = model.decode_step(seq[:, i], cache)
        _close(logits[0], full[i])
    assert int(cache.pos[0]) == LENGTH


def _chunked(model, seq, sizes):
    cache, start = model.init_cache(1, 160), 0
    for n in sizes:
        logits, cache = model.prefill(seq[:, start : start + n], cache)
        start += n
    return logits, cache


@pytest.mark.parametrize("sizes", [[1] * 20, [7] * 20, [64, 64, 12], [5, 60, 1, 33, 41]])
def test_chunked_prefill_equals_one_shot(model, seq, sizes):
    n = sum(sizes)
    one_logits, one_cache = _chunked(model, seq, [n])
    logits, cache = _chunked(model, seq, sizes)
    _close(logits, one_logits)
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(one_cache), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        finite = np.isfinite(b)
        assert np.array_equal(finite, np.isfinite(a))
        scale = max(np.abs(b[finite]).max(initial=0.0), 1e-6)
        assert np.abs(a[finite] - b[finite]).max(initial=0.0) <= TOL * scale


def test_batch_invariance(model, seq):
    """A sequence's logits do not depend on what else is in the batch. Not bitwise on XLA:CPU:
    its GEMMs pick blocking (and so float32 summation order) from the matrix shape, which the
    batch size and padded length change; measured differences are ~5e-7 of the scale."""
    rng = np.random.default_rng(1)
    others = [rng.integers(2, CFG.vocab_size, n).tolist() for n in (5, 131)]
    mine = seq[0, :37].tolist()
    prompts = [others[0], mine, others[1]]
    tokens, lengths = v4jax.decode.pad_prompts(prompts)

    def run(tokens, lengths, steps):
        cache = model.init_cache(len(lengths), 160)
        logits, cache = model.prefill(tokens, cache, lengths)
        out = [np.asarray(logits)]
        for i in range(steps):
            logits, cache = model.decode_step(
                jnp.asarray(seq[:, 37 + i].repeat(len(lengths))), cache
            )
            out.append(np.asarray(logits))
        return np.stack(out)

    together = run(tokens, lengths, 6)[:, 1]
    alone = run(np.asarray([mine]), np.asarray([37]), 6)[:, 0]
    assert np.abs(together - alone).max() <= 1e-6 * np.abs(alone).max()


def test_bf16_batch_close(seq):
    bf = v4jax.init(CFG, seed=5, numerics="bf16")
    tokens, lengths = v4jax.decode.pad_prompts([seq[0, :9].tolist(), seq[0, :30].tolist()])
    both, _ = bf.prefill(tokens, bf.init_cache(2, 64), lengths)
    alone, _ = bf.prefill(seq[:, :30], bf.init_cache(1, 64))
    # bf16 noise: a few bf16 ulps of the logits' scale
    assert np.abs(np.asarray(both[1]) - np.asarray(alone[0])).max() <= 0.02 * np.abs(alone).max()


def test_generate_matches_streaming_and_greedy(model, seq):
    prompts = [seq[0, :3].tolist(), seq[0, :50].tolist()]
    gen = v4jax.generate(model, prompts, max_new_tokens=8, eos_id=-1)
    assert gen.tokens.shape == (2, 8) and gen.lengths.tolist() == [8, 8]
    stream = list(v4jax.generate_stream(model, prompts[1], max_new_tokens=8, eos_id=-1))
    assert stream == gen.tokens[1].tolist()
    # greedy = argmax of the full forward on the generated sequence
    full = np.asarray(model.logits(np.asarray([prompts[1] + stream])))[0]
    assert full[49:-1].argmax(-1).tolist() == stream[:]


def test_generate_stops_at_eos(model, seq):
    prompt = seq[0, :10].tolist()
    first = v4jax.generate(model, [prompt], max_new_tokens=4, eos_id=-1).tokens[0]
    gen = v4jax.generate(model, [prompt], max_new_tokens=4, eos_id=int(first[1]))
    assert gen.lengths.tolist() == [2]
    assert gen.sequences() == [first[:2].tolist()]


def test_sampling_is_seeded(model, seq):
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=3)
    a = v4jax.generate(model, [seq[0, :5].tolist()], max_new_tokens=6, sampling=s).tokens
    b = v4jax.generate(model, [seq[0, :5].tolist()], max_new_tokens=6, sampling=s).tokens
    np.testing.assert_array_equal(a, b)


def test_sampling_filters():
    from v4jax.decode.sampling import top_k_mask, top_p_mask

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(np.asarray(top_k_mask(logits, 2))).tolist() == [[True, True, False, False]]
    assert np.isfinite(np.asarray(top_p_mask(logits, 0.75))).tolist() == [
        [True, True, False, False]
    ]
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_cache_save_restore(model, seq, tmp_path):
    logits, cache = model.prefill(seq[:, :50], model.init_cache(1, 160))
    save_cache(tmp_path / "c", cache, model)
    restored = load_cache(tmp_path / "c", model)
    a, _ = model.decode_step(seq[:, 50], cache)
    b, _ = model.decode_step(seq[:, 50], restored)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = v4jax.init(CFG.replace(index_topk=4), seed=5, numerics="bf16", dtype=jnp.float32)
    with pytest.raises(ValueError, match="config_sha256"):
        load_cache(tmp_path / "c", other)
    bf16 = v4jax.init(CFG, seed=5, numerics="bf16")
    with pytest.raises(ValueError, match="dtype"):
        load_cache(tmp_path / "c", bf16)


def test_prompt_longer_than_cache(model, seq):
    with pytest.raises(ValueError, match="longer than the cache"):
        model.prefill(seq[:, :40], model.init_cache(1, 32))
    cache = model.prefill(seq[:, :32], model.init_cache(1, 32))[1]
    with pytest.raises(ValueError, match="longer than the cache"):
        model.decode_step(seq[:, 32], cache)
    with pytest.raises(ValueError, match="batch"):
        model.prefill(seq[:, :4], model.init_cache(2, 32))


def test_cache_bytes():
    flash = cache_bytes(v4jax.config.flash(), 2**20)
    assert flash["per_token"] == 6880  # 21 CSA x 320 B + 20 HCA x 8 B (reference, bf16)
    assert abs(flash["total"] / 2**30 - 6.72) < 0.03
    assert cache_bytes(v4jax.config.pro(), 2**20)["per_token"] == 9848
    model = v4jax.init(CFG, seed=0)  # bf16 cache
    est = cache_bytes(CFG, 1024)
    assert measured_bytes(model.init_cache(1, 1024)) == est["total"] + 4  # + the position
