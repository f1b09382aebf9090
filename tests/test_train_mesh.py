"""Training on a device mesh (8 fake CPU devices, tests/conftest.py), issue 11 §1: the sharded
train step equals the unsharded one in float32 ("bf16" numerics with float32 activations: no
rounding anywhere) for the loss, every gradient and one full V4 optimizer step (Muon with the
8+2 Newton-Schulz schedule on whole matrices per device, AdamW, clipping, weight decay, the
router-bias update), on the meshes the issue names; the state is ZeRO-sharded and keeps its
placement (the step's output shardings are pinned to its input's, so the next step reuses the
compiled program).

The gradients are read from the optimizer state after the first step: Muon's momentum is then
the clipped gradient itself (M_1 = 0.95 * 0 + g) and Adam's first moment is (1 - b1) times it;
the clip factor is the same for both runs up to the gradient norm, compared on its own.

Tolerances: a mesh changes only reduction orders (the batch split over data ranks, partial
sums over fsdp / tensor ranks, experts over expert ranks), so every value agrees to a few
float32 roundings: the loss and the gradient norm to 1e-6 relative; the gradients (moments)
to 1e-6 of the whole tree's norm and each leaf to 1e-4 of its largest entry (see `_close`);
each parameter's update (lr 1e-2) to 1e-3 of its largest entry (Newton-Schulz
amplification, see `_compare`; still fails on the MTP block's routed experts: work in
progress); the router biases exactly (sign of load differences: integer token counts).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
import v4jax
from v4jax.train import make_optimizer
from v4jax.train import model as tmodel
from v4jax.train.schedule import LRSchedule
from v4jax.train.step import LossWeights, init_state, make_step

MESHES = [
    "data=2 x fsdp=4",
    "fsdp=2 x tensor=4",
    "fsdp=2 x expert=4",
    "data=2 x expert=2 x tensor=2",
]
B, S = 8, 64  # S > window 16 and > 4 x 4-token CSA blocks; B splits over every data-like axis
SCHED = LRSchedule(peak=1e-2, warmup=0, decay_start=1, total=2)
WEIGHTS = LossWeights(balance=1e-4, mtp=0.3)


def _cfg():
    return v4jax.config.tiny()


def _batch(cfg):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (1, B, S)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[0, 1, 40:] = 0  # padding on one row: masked targets cross the shard split too
    return tokens, mask


def _run(tm, tokens, mask):
    """(new state, metrics) of one step from `tm`, pulled to the host."""
    opt = make_optimizer(tm.params, schedule=SCHED)
    state = init_state(tm, opt)
    before = jax.tree.map(lambda x: x.sharding, (state.params, state.opt_state))
    new, metrics = make_step(tm, opt, SCHED, WEIGHTS)(state, tokens, mask)
    if tm.mesh is not None:  # ZeRO: moments exactly as their parameters, kept by the step
        after = jax.tree.leaves((new.params, new.opt_state))
        for x, sh in zip(after, jax.tree.leaves(before), strict=True):
            assert x.ndim == 0 or x.sharding.is_equivalent_to(sh, x.ndim), (x.sharding, sh)
    return jax.tree.map(np.asarray, (new, metrics))


@pytest.fixture(scope="module")
def plain():
    cfg = _cfg()
    tm = tmodel.trainable(v4jax.init(cfg, seed=0, numerics="bf16", dtype=jnp.float32))
    return tm, _run(tm, *_batch(cfg))


def _close(label, got: dict, want: dict, leaf: float = 1e-4) -> dict:
    """Whole-tree and per-leaf agreement of two trees of arrays (same keys).

    The whole tree to 1e-6 of its norm (the issue's bound); each leaf to 1e-4 of its own
    largest entry: small leaves that sum many terms with cancellation (the mHC head bias's
    gradient, terms ~100x the result) differ by ~3e-6 of their largest entry in float32 when
    only the order of the sum changes, their Adam second moments (squares) by 2.5e-5 (measured
    on data=2 x fsdp=4), while a wrongly sharded or unreduced leaf is off by O(1)."""
    num = den = 0.0
    worst = (0.0, "")
    for k, w in want.items():
        d = np.abs(got[k] - w)
        num, den = num + float(np.sum(d * d)), den + float(np.sum(np.square(w)))
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        rel = float(np.max(d)) / scale if scale else float(np.max(d, initial=0.0))
        assert rel <= leaf, f"{label} {k}: max error {rel:.3g} of the leaf's largest entry"
        worst = max(worst, (rel, k))
    tree = (num / den) ** 0.5 if den else num**0.5
    assert tree <= 1e-6, f"{label}: error {tree:.3g} of the tree's norm"
    return {"tree": tree, "worst leaf": worst}


@pytest.mark.slow
@pytest.mark.parametrize("spec", MESHES)
def test_sharded_step_equals_unsharded(plain, spec):
    tm0, (state0, m0) = plain
    cfg = _cfg()
    placed = _placed(cfg, spec)
    split = [x for x in jax.tree.leaves(placed.params) if not x.sharding.is_fully_replicated]
    assert len(split) > 0.9 * len(jax.tree.leaves(placed.params)), "ZeRO: most leaves split"
    state, m = _run(placed, *_batch(cfg))
    _compare(tm0, state0, m0, state, m, spec)


def _compare(tm0, state0, m0, state, m, label):
    assert bool(m["finite"]) and float(m["grad_norm"]) > 1.0  # clipping acts
    for k in ("loss", "ce", "mtp", "balance", "grad_norm"):
        np.testing.assert_allclose(m[k], m0[k], rtol=1e-6, err_msg=k)
    flat = lambda t: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(t)}
    p0 = {k: np.asarray(v) for k, v in flat(tm0.params).items()}
    worst = {  # Muon M_1 = clipped g; Adam m_1 = (1 - b1) clipped g, v_1
        "moments": _close("moments", flat(state.opt_state), flat(state0.opt_state)),
    }
    new, new0 = flat(state.params), flat(state0.params)
    for k, p in p0.items():  # one step: each parameter's update
        # the update itself (new - old carries one float32 rounding of the parameter, ~1e-5
        # of the update; Newton-Schulz maps tiny singular values to ~1 and amplifies their
        # rounding: measured 5.5e-4 of the leaf's max on an MTP expert) to 1e-3
        du, dw = new[k] - p, new0[k] - p
        assert float(np.max(np.abs(du - dw))) <= 1e-3 * float(np.max(np.abs(dw))), k
    for k, v in flat(state.frozen).items():
        np.testing.assert_array_equal(v, flat(state0.frozen)[k], err_msg=k)
    print(label, "worst error / scale:", worst)
    return worst


def _placed(cfg, spec):
    mesh = sharding.make_mesh(spec)
    model = v4jax.init(cfg, seed=0, numerics="bf16", dtype=jnp.float32, mesh=mesh, rules="train")
    return tmodel.trainable(model)


@pytest.mark.slow
def test_accumulation_on_a_mesh_equals_the_larger_batch(plain):
    """Issue 11 §4: 4 micro-batches of 2 rows on fsdp=2 x tensor=4 (each micro-batch split
    over the 2 fsdp ranks) == one batch of 8 rows unsharded, to the same tolerances (the step
    weights each micro-batch by its share of the targets, so the padded row changes nothing)."""
    tm0, (state0, m0) = plain
    tokens, mask = _batch(_cfg())
    micro = lambda x: x.reshape(4, B // 4, S)
    state, m = _run(_placed(_cfg(), "fsdp=2 x tensor=4"), micro(tokens), micro(mask))
    _compare(tm0, state0, m0, state, m, "4 micro-batches")
