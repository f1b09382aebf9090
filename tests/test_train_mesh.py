"""Training on a device mesh (8 fake CPU devices, tests/conftest.py): one step of the sharded
train step equals the unsharded one, and the state keeps its placement (the step's output
shardings are pinned to its input's, so the next step reuses the compiled program)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharding
import v4jax
from v4jax.train import model as tmodel
from v4jax.train.schedule import LRSchedule
from v4jax.train.step import LossWeights, init_state, make_step


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["data=2 x expert=4", "fsdp=2 x tensor=4"])
def test_sharded_step_equals_unsharded(spec):
    """Same maths, other reduction orders (the batch split over data ranks, experts over
    expert ranks): gradients agree to 1e-5 of each leaf's largest entry plus one rounding of
    the parameter (SGD at learning rate 1: new params = params - grads; see
    test_train_loop.test_accumulation_equals_the_larger_batch)."""
    cfg = v4jax.config.tiny()
    mesh = sharding.make_mesh(spec)
    plain = tmodel.trainable(v4jax.init(cfg, seed=0, numerics="bf16", dtype=jnp.float32))
    placed = tmodel.trainable(
        v4jax.init(cfg, seed=0, numerics="bf16", dtype=jnp.float32, mesh=mesh, rules=sharding.TRAIN)
    )
    assert any(
        len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
        for x in jax.tree.leaves(placed.params)
    ), "nothing was sharded"
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (1, 4, 32)).astype(np.int32)
    mask = np.ones_like(tokens)
    opt, sched = optax.sgd(1.0), LRSchedule(peak=1.0, warmup=0, decay_start=1, total=2)
    weights = LossWeights(balance=1e-4)
    results = []
    for tm in (plain, placed):
        step = make_step(tm, opt, sched, weights)
        state = init_state(tm, opt)
        before = jax.tree.map(lambda x: x.sharding, state.params)
        state, m = step(state, tokens, mask)
        for x, sh in zip(jax.tree.leaves(state.params), jax.tree.leaves(before), strict=True):
            assert x.sharding.is_equivalent_to(sh, x.ndim), (x.sharding, sh)
        results.append((state, m))
    (s1, m1), (s2, m2) = results
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    leaves = zip(
        jax.tree.leaves(plain.params),
        jax.tree.leaves(s1.params),
        jax.tree.leaves(s2.params),
        strict=True,
    )
    for p0, x, y in leaves:
        x, y, p0 = np.asarray(x), np.asarray(y), np.asarray(p0)
        scale = float(np.abs(p0 - x).max())
        bound = 1e-5 * scale + np.spacing(np.abs(p0))
        assert float(np.max(np.abs(x - y) - bound)) <= 0, p0.shape
