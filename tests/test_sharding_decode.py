"""Sharded prefill + decode == unsharded (float32, 8 fake CPU devices)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import sharding
import v4jax

# dims divide every mesh below: 8 experts, 8 heads / indexer heads, 2 output groups
CFG = v4jax.config.tiny(num_heads=8, index_heads=8, index_topk=3)


def _run(model, tokens, lengths, steps):
    cache = model.init_cache(tokens.shape[0], 64)
    logits, cache = model.prefill(tokens, cache, lengths)
    out = [np.asarray(logits)]
    for i in range(steps):
        logits, cache = model.decode_step(tokens[:, i % tokens.shape[1]], cache)
        out.append(np.asarray(logits))
    return np.stack(out)


@pytest.mark.parametrize("mesh", ["fsdp=8", "expert=4 x tensor=2", "data=2 x expert=4"])
def test_sharded_prefill_decode_equals_unsharded(mesh):
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, CFG.vocab_size, (2, 21)).astype(np.int32)
    lengths = np.array([21, 9], np.int32)
    plain = v4jax.init(CFG, seed=1, numerics="bf16", dtype=jnp.float32)
    sharded = v4jax.init(
        CFG, seed=1, numerics="bf16", dtype=jnp.float32, mesh=sharding.make_mesh(mesh)
    )
    want = _run(plain, tokens, lengths, 6)
    got = _run(sharded, tokens, lengths, 6)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
