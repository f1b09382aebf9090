"""Rematerialisation policies (`v4jax.model.remat`): each keeps what it says and changes no value.

What the backward keeps is read from the traced program (`saved_residuals`: the residuals a
`jax.grad` stores between forward and backward, each with the reason it is stored), so these
tests trace but compile only in the slow gradient test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

import v4jax
from v4jax.model import remat
from v4jax.train import losses
from v4jax.train import model as tmodel


@pytest.fixture(scope="module")
def setup():
    cfg = v4jax.config.tiny()
    tm = tmodel.trainable(v4jax.init(cfg, seed=0, numerics="bf16", dtype=jnp.float32))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size))
    return tm, tokens


def _residuals(tm, tokens, policy):
    """(names kept by `checkpoint_name` in device memory, total bytes of the stored
    residuals, bytes of those stored in host memory)."""
    fn = lambda p: losses.loss(tm.replace(params=p), tokens, remat=policy)[0]
    res = saved_residuals(fn, tm.params)
    named = {why.split("'")[1] for _, why in res if why.startswith("named '")}
    size = lambda a: np.prod(a.shape) * a.dtype.itemsize
    host = sum(size(a) for a, _ in res if str(getattr(a, "memory_space", "")).endswith("Host"))
    return named, sum(size(a) for a, _ in res), host


def test_each_policy_keeps_what_it_names(setup):
    tm, tokens = setup
    policies = ("none", "block", "tensors", "save:attn_out", "offload:attn_out")
    kept = {p: _residuals(tm, tokens, p) for p in policies}
    # "none" keeps whatever the backward uses (some of it happens to carry a name, e.g. q);
    # "block" keeps only the blocks' inputs, so no named tensor.
    assert kept["block"][0] == set()
    assert kept["tensors"][0] == set(remat.TENSORS)
    assert kept["save:attn_out"][0] == {"attn_out"}
    # "offload": the same residuals, the named ones in host memory: attn_out [B, S, D]
    # float32 of the 4 scanned layers and of the MTP block, all on S = 32 positions (the
    # MTP's last one has no target but keeps the sequence's length: losses._loss)
    named, total, host = kept["offload:attn_out"]
    assert named == set() and total == kept["save:attn_out"][1]
    assert host == (4 * 2 * 32 + 2 * 32) * 256 * 4
    assert all(k[2] == 0 for p, k in kept.items() if not p.startswith("offload"))
    # Memory between forward and backward: each policy keeps less than the one above it.
    sizes = [kept[p][1] for p in ("none", "tensors", "save:attn_out", "block")]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1], sizes


@pytest.mark.parametrize(
    "spec, message",
    [
        ("all", "expected one of"),
        ("save:attn_out,banana", "unknown tensor name(s) ['banana']"),
        ("save:", "unknown tensor name"),
        ("offload:attn_q,banana", "unknown tensor name(s) ['banana']"),
    ],
)
def test_bad_policies_are_refused_in_one_line(spec, message):
    with pytest.raises(ValueError, match=None) as e:
        remat.check(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_gradients_do_not_depend_on_the_policy(setup):
    """Recomputation runs the same operations on the same inputs; XLA may fuse the recomputed
    copy differently, so float32 rounding differs: 1e-6 of each leaf's largest entry."""
    tm, tokens = setup
    grads = {}
    for policy in ("none", "block", "tensors", "offload"):
        fn = lambda p, policy=policy: losses.loss(tm.replace(params=p), tokens, remat=policy)[0]
        grads[policy] = jax.jit(jax.value_and_grad(fn))(tm.params)
    for policy in ("block", "tensors", "offload"):
        assert float(grads[policy][0]) == pytest.approx(float(grads["none"][0]), rel=1e-6)
        ref, got = jax.tree.leaves(grads["none"][1]), jax.tree.leaves(grads[policy][1])
        pairs = zip(ref, got, strict=True)
        for a, b in pairs:
            scale = float(jnp.max(jnp.abs(a)))
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-6 * max(scale, 1e-30), policy
