"""Context parallelism (issue 11 §3; `v4jax/model/context_parallel.py`): one attention layer with
its sequence split over a `context` mesh axis (8 fake CPU devices: data=2 x context=4) equals
the unsharded layer, forward and backward, and its compiled HLO moves exactly the boundary
rows and compressed entries of `context_parallel.traffic`, never the full-length K = V.

S = 520 tokens: 130 per shard, so the sliding window (16), a CSA block (130 = 4 x 32 + 2), the
CSA compressor's overlap and the second HCA block (tokens 128..255, over shards 0 and 1) all
cross shard edges. The whole train step on a context x fsdp mesh: tests/test_train_mesh.py.

Tolerances: float32 throughout ("bf16" numerics with float32 activations); sharding changes
only summation orders (the entries' pooling and the attention sums run over the same rows in
the same order; parameter gradients are summed over shards), so outputs and the KL agree to
1e-6 of their scale and gradients to 1e-6 of the tree's norm.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
import v4jax
from sharding.train_plan import collective_bytes
from v4jax.checkpoint.names import layer_slots
from v4jax.model import context_parallel, indexer
from v4jax.train import losses
from v4jax.train.model import trainable

MESH = "data=2 x context=4"
B, S = 2, 520
CSA, HCA = 1, 2  # main-stack layers of config.tiny(): compress ratios (0, 4, 128, 4)


@pytest.fixture(scope="module")
def model():
    """The training model (float32 masters) of a random tiny release."""
    return trainable(v4jax.init(v4jax.config.tiny(), seed=0, numerics="bf16", dtype=jnp.float32))


def _attention(tm, index: int):
    """Main-stack layer `index`'s attention module, sliced out of its stacked segment."""
    seg, rep, pos = layer_slots(tm.config)[index]
    gd, st = nnx.split(tm.module().segments[seg])
    return nnx.merge(gd, jax.tree.map(lambda a: a[rep], st)).blocks[pos].attn


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(MESH)


def _program(attn, stage: str):
    """jit(value_and_grad) of a scalar of the layer's output and KL, w.r.t. (params, u)."""
    gd, st = nnx.split(attn)
    leaves, tree = jax.tree.flatten(st)
    masters = [i for i, x in enumerate(leaves) if x.dtype == jnp.float32]  # not the FP8 scales
    d = attn.cfg.dim
    proj = jnp.asarray(np.random.default_rng(1).normal(size=(d,)), jnp.float32)

    def f(ws, u):
        full = list(leaves)
        for i, w in zip(masters, ws, strict=True):
            full[i] = w
        o, (kl, n) = nnx.merge(gd, jax.tree.unflatten(tree, full)).forward_train(u, stage)
        return jnp.sum(o @ proj) + kl, (o, kl, n)

    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    return fn, [leaves[i] for i in masters]


def _u(d: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(B, S, d)).astype(np.float32)


def _run(attn, stage, mesh=None):
    fn, st = _program(attn, stage)
    u = _u(attn.cfg.dim)
    if mesh is None:
        return jax.tree.map(np.asarray, fn(st, u))
    u = jax.device_put(u, NamedSharding(mesh, P("data", "context", None)))
    with sharding.use_rules(mesh, "train"):
        return jax.tree.map(np.asarray, fn(st, u)), fn.lower(st, u).compile().as_text()


def _rel(a, b) -> float:
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-30)


@pytest.mark.parametrize(
    "layer,stage", [(CSA, "sparse"), (CSA, "off"), (HCA, "off")], ids=["csa-kl", "csa", "hca"]
)
def test_context_parallel_attention_equals_unsharded(model, mesh, layer, stage):
    attn = _attention(model, layer)
    (_, (o0, kl0, n0)), (g0, gu0) = _run(attn, stage)
    ((_, (o1, kl1, n1)), (g1, gu1)), hlo = _run(attn, stage, mesh)
    assert _rel(o1, o0) <= 1e-6
    np.testing.assert_allclose(kl1, kl0, rtol=1e-6)
    assert float(n1) == float(n0) and (stage == "off" or float(kl0) > 0)
    assert _rel(gu1, gu0) <= 1e-6  # the input's gradient: every shard's own rows
    a, b = jax.tree.leaves(g1), jax.tree.leaves(g0)
    num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b, strict=True))
    den = sum(float(np.sum(y**2)) for y in b)
    assert (num / den) ** 0.5 <= 1e-6

    # the HLO: the formula's collectives and nothing of full length
    moved, _ = collective_bytes(hlo)
    want = context_parallel.traffic(attn, B // 2, S, 4, backward=True, indexer_grad=stage != "off")
    for kind, n in want.items():
        assert moved[kind] == n, (kind, moved[kind], n)
    assert moved["all-to-all"] == 0
    for line in hlo.splitlines():
        if "all-gather" in line or "collective-permute" in line:
            assert f",{S}," not in line and f"[{B // 2},{S}," not in line, line


def _close(got, want) -> None:
    """Output, KL, query count and every gradient within this module's tolerances."""
    (_, (o1, kl1, n1)), (g1, gu1) = got
    (_, (o0, kl0, n0)), (g0, gu0) = want
    assert _rel(o1, o0) <= 1e-6 and _rel(gu1, gu0) <= 1e-6
    np.testing.assert_allclose(kl1, kl0, rtol=1e-6)
    assert float(n1) == float(n0) and float(kl0) > 0
    a, b = jax.tree.leaves(g1), jax.tree.leaves(g0)
    num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b, strict=True))
    assert (num / sum(float(np.sum(y**2)) for y in b)) ** 0.5 <= 1e-6


def test_indexer_query_chunks_equal_one_chunk(model, mesh, monkeypatch):
    """`Indexer.pick` in chunks of queries (its [B, c, H, C] logits bounded by SCORE_BUDGET)
    equals the whole sequence at once, forward and backward, unsharded (2 x 520 queries over
    130 entries: chunks of 7, the last padded) and with the sequence over 4 context shards
    (1 x 130 local queries over all 130 entries: chunks of 14, the last padded). Rows are
    independent; only the gradients' sums over queries are split (1e-6)."""
    attn = _attention(model, CSA)
    want = _run(attn, "sparse")
    h = attn.cfg.index_heads
    monkeypatch.setattr(indexer, "SCORE_BUDGET", B * h * (S // 4) * 7)
    _close(_run(attn, "sparse"), want)
    got, hlo = _run(attn, "sparse", mesh)
    _close(got, want)
    assert '"known_trip_count":{"n":"10"}' in hlo  # the loop over 10 chunks is there


def test_context_parallel_lengths_are_checked(model):
    attn = _attention(model, HCA)
    with pytest.raises(ValueError, match="not divisible by the 4 context shards"):
        context_parallel.check_lengths(attn, 522, 4)
    with pytest.raises(ValueError, match="fewer than the 128 boundary tokens"):
        context_parallel.check_lengths(attn, 508, 4)
    assert context_parallel.check_lengths(attn, 520, 4) == 130


def test_the_train_loss_refuses_a_length_the_context_axis_does_not_divide(mesh):
    tm = trainable(v4jax.init(v4jax.config.tiny(), numerics="bf16", mesh=mesh, rules="train"))
    assert tm.context_shards() == 4
    with pytest.raises(ValueError, match="length 522 is not divisible by the mesh's 4 context"):
        losses.loss(tm, np.zeros((2, 522), np.int32))
