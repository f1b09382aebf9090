"""The V4 optimizer and LR schedule (V4 report §2.4, §4.2.2).

Oracles are float64 numpy written from the report's formulas (Newton-Schulz, sum momentum with
Nesterov, AdamW), not our own outputs. Singular values via eigvalsh of the float64 Gram matrix.
"""

import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import v4jax
from v4jax.train import optim
from v4jax.train.optim import V4_NS_COEFFS, OptimConfig, make_optimizer, newton_schulz
from v4jax.train.schedule import LRSchedule, flash_schedule, pro_schedule

QUINTIC5 = ((3.4445, -4.7750, 2.0315),) * 5  # the standard Muon schedule: 5 steps


def _ns_ref(x, coeffs=V4_NS_COEFFS):
    """float64 NS as V4 report §2.4 writes it: X <- aX + b(XX^T)X + c(XX^T)^2 X on X / ||X||_F."""
    x = np.asarray(x, np.float64)
    x = x / np.linalg.norm(x)
    for a, b, c in coeffs:
        g = x @ x.T
        x = a * x + b * g @ x + c * g @ g @ x
    return x


def _sv_range(y):
    y = np.asarray(y, np.float64)
    g = y @ y.T if y.shape[0] <= y.shape[1] else y.T @ y  # small Gram; eigvalsh << SVD here
    s = np.sqrt(np.linalg.eigvalsh(g))
    return float(s.min()), float(s.max())


def _rng_tree(shapes, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s), jnp.float32),
        shapes,
        is_leaf=lambda s: isinstance(s, tuple),
    )


def _times(tree, c):
    return jax.tree.map(lambda x: c * x, tree)


# A small tree with real model names: both groups, stacked and unstacked leaves.
SHAPES = {
    "embed": (64, 32),
    "norm": {"weight": (32,)},
    "mtp": {"e_proj": {"weight": (32, 32)}},
    "segments": {
        0: {
            "blocks": {
                0: {
                    "attn": {"wq_a": {"weight": (2, 24, 32)}, "attn_sink": (2, 4)},
                    "ffn": {"experts": {"w1": (2, 3, 16, 48), "w2": (2, 3, 48, 16)}},
                }
            }
        }
    },
}
CLIP_FREE = OptimConfig(clip_norm=None)


# --------------------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", [(512, 2048), (2048, 512)])
def test_hybrid_ns_singular_values(shape):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    lo, hi = _sv_range(jax.jit(newton_schulz)(x))
    qlo, qhi = _sv_range(jax.jit(lambda x: newton_schulz(x, QUINTIC5))(x))
    print(f"{shape}: 8+2 sv [{lo:.5f}, {hi:.5f}]; 5-step quintic sv [{qlo:.4f}, {qhi:.4f}]")
    assert 0.99 <= lo and hi <= 1.01  # the hybrid schedule's purpose (§2.4)
    assert qlo < 0.99 or qhi > 1.01  # the quintic alone only reaches ~[0.7, 1.13]


def test_ns_matches_float64_formula():
    # Tall and wide: ours transposes a tall matrix first; the reference never does.
    rng = np.random.default_rng(1)
    for shape in [(24, 96), (96, 24)]:
        x = rng.standard_normal(shape).astype(np.float32)
        got = np.asarray(newton_schulz(jnp.asarray(x)))
        # float32 vs float64 over 10 steps: measured ~1e-6 on entries of size ~0.2.
        np.testing.assert_allclose(got, _ns_ref(x), atol=1e-5)
    # bfloat16 matmuls (V4 §3.5.1): still orthogonal to bf16 precision (8-bit mantissa, ~0.4%
    # per op; measured within 0.7%), result in the input dtype.
    x = jnp.asarray(rng.standard_normal((64, 256)), jnp.float32)
    y = newton_schulz(x, dtype=jnp.bfloat16)
    lo, hi = _sv_range(y)
    assert y.dtype == jnp.float32 and 0.98 <= lo and hi <= 1.02, (lo, hi)
    with pytest.raises(ValueError, match="needs a matrix"):
        newton_schulz(jnp.ones(3))


# --------------------------------------------------------------------------- Muon


@pytest.mark.parametrize("name", ["w1", "w2"])
def test_each_expert_orthogonalised_on_its_own(name):
    shapes = {"segments": SHAPES["segments"]}
    params = jax.tree.map(jnp.zeros_like, _rng_tree(shapes, 0))
    grads = _rng_tree(shapes, 1)
    path = ("segments", 0, "blocks", 0, "ffn", "experts", name)
    g = np.asarray(grads["segments"][0]["blocks"][0]["ffn"]["experts"][name])  # [L, E, O, I]
    g = g * np.array([1.0, 30.0, 0.01])[None, :, None, None]  # experts at very different scales
    grads["segments"][0]["blocks"][0]["ffn"]["experts"][name] = jnp.asarray(g)
    lr = 1e-3
    opt = make_optimizer(params, schedule=lr)
    u, _ = opt.update(grads, opt.init(params), params)
    got = np.asarray(u["segments"][0]["blocks"][0]["ffn"]["experts"][name])
    got = got / (-lr * 0.18 * np.sqrt(48))  # first step: NS((1 + mu) G), scale-free
    ref = np.stack([np.stack([_ns_ref(g[i, e]) for e in range(3)]) for i in range(2)])
    np.testing.assert_allclose(got, ref, atol=1e-5, err_msg="/".join(map(str, path)))
    # Orthogonalising the experts jointly (one [E*O, I] matrix per layer) is a different update.
    joint = np.stack([_ns_ref(g[i].reshape(-1, g.shape[-1])).reshape(g.shape[1:]) for i in (0, 1)])
    assert np.abs(joint - ref).max() > 1e-2


def test_muon_update_rms_follows_schedule():
    params = jax.tree.map(jnp.zeros_like, _rng_tree(SHAPES, 0))  # zero params: no decay term
    sched = LRSchedule(peak=1e-3, warmup=4, decay_start=4, total=10)
    opt = make_optimizer(params, schedule=sched)
    state = opt.init(params)
    for step in range(2):
        u, state = opt.update(_rng_tree(SHAPES, 10 + step), state, params)
        for w in (
            u["mtp"]["e_proj"]["weight"][None],
            u["segments"][0]["blocks"][0]["attn"]["wq_a"]["weight"],
        ):
            rms = np.sqrt(np.mean(np.square(np.asarray(w)), axis=(-2, -1)))  # per layer
            # Singular values within [0.99, 1.01] (test above) bound the RMS within 1%.
            np.testing.assert_allclose(rms / float(sched(step)), 0.18, rtol=1e-2)


def test_muon_sum_momentum_and_nesterov_two_steps():
    shapes = {"mtp": {"e_proj": {"weight": (16, 40)}}}
    params = jax.tree.map(jnp.zeros_like, _rng_tree(shapes, 0))
    g1, g2 = _rng_tree(shapes, 1), _rng_tree(shapes, 2)
    opt = make_optimizer(params, schedule=1.0, config=CLIP_FREE)
    state = opt.init(params)
    _, state = opt.update(g1, state, params)
    u, _ = opt.update(g2, state, params)
    a, b = (np.asarray(g["mtp"]["e_proj"]["weight"], np.float64) for g in (g1, g2))
    m2 = 0.95 * a + b  # M_2 = mu M_1 + G_2 (plain sum, V4 report §2.4)
    ref = -0.18 * np.sqrt(40) * _ns_ref(0.95 * m2 + b)  # Nesterov input mu M_2 + G_2
    np.testing.assert_allclose(np.asarray(u["mtp"]["e_proj"]["weight"]), ref, atol=1e-5)
    # optax's bias-corrected EMA weights G_1 0.374:1 against G_2 instead of 0.463:1.
    ema = -0.18 * np.sqrt(40) * _ns_ref(0.374 * a + b)
    assert np.abs(ema - ref).max() > 1e-3


# --------------------------------------------------------------------------- AdamW, decay, clip


def _adamw_ref(p, grads, lrs, *, b1=0.9, b2=0.95, eps=1e-20, wd=0.1, clip=1.0):
    """float64 AdamW (no Nesterov) on one leaf; grads[t] = (this leaf, global norm)."""
    p, m, v, out = np.asarray(p, np.float64), 0.0, 0.0, []
    for t, ((g, gnorm), lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        g = np.asarray(g, np.float64) * min(1.0, clip / gnorm)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        upd = -lr * ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * p)
        out.append(upd)
        p = p + upd
    return out


def test_adamw_matches_reference_with_clipping():
    params = _rng_tree(SHAPES, 0)
    grads = [_rng_tree(SHAPES, 1, scale=0.5), _rng_tree(SHAPES, 2, scale=0.005)]
    norms = [float(optax.tree.norm(g)) for g in grads]
    assert norms[0] > 1 > norms[1]  # step 1 is clipped, step 2 is not
    sched = lambda step: 1e-3 * (step + 1.0)
    opt = make_optimizer(params, schedule=sched)
    state, p, got = opt.init(params), params, []
    for g in grads:
        u, state = opt.update(g, state, p)
        p = optax.apply_updates(p, u)
        got.append(u)
    lrs = [1e-3, 2e-3]
    pick = {"embed": lambda t: t["embed"], "norm": lambda t: t["norm"]["weight"]}
    for key, wd in (("embed", 0.1), ("norm", 0.0)):  # embedding decayed, RMSNorm gain not
        steps = [(pick[key](g), n) for g, n in zip(grads, norms, strict=True)]
        ref = _adamw_ref(pick[key](params), steps, lrs, wd=wd)
        for u, r, lr in zip(got, ref, lrs, strict=True):
            # float32 against float64. The update is the sum of two O(lr) terms (Adam direction
            # and decay) that can cancel, so the absolute error scales with lr: 1e-6 lr.
            np.testing.assert_allclose(np.asarray(pick[key](u)), r, rtol=1e-5, atol=1e-6 * lr)
    # The reference tells b2 0.999 and a missing clip apart (relative gaps >> 1e-5):
    steps = [(g["embed"], n) for g, n in zip(grads, norms, strict=True)]
    for change in ({"b2": 0.999}, {"clip": np.inf}):
        other = _adamw_ref(params["embed"], steps, lrs, **change)[1]
        assert np.abs(other / np.asarray(got[1]["embed"]) - 1).max() > 1e-3, change


def test_adamw_eps_is_1e_minus_20():
    shapes = {"embed": (8, 4)}
    params = jax.tree.map(jnp.zeros_like, _rng_tree(shapes, 0))
    grads = {"embed": jnp.full((8, 4), 1e-10, jnp.float32)}
    opt = make_optimizer(params, schedule=1.0)
    u, _ = opt.update(grads, opt.init(params), params)
    # m_hat / (sqrt(v_hat) + eps) = 1e-10 / (1e-10 + 1e-20): 1 to float32 precision; optax's
    # default eps 1e-8 would give 0.0099.
    np.testing.assert_allclose(np.asarray(u["embed"]), -1.0, rtol=1e-6)


@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_weight_decay_multiplies_lr(kind):
    params = _rng_tree(SHAPES, 0)
    zeros = jax.tree.map(jnp.zeros_like, params)  # zero gradient: the update is the decay alone
    sched = LRSchedule(peak=2e-3, warmup=4, decay_start=4, total=10)
    opt = make_optimizer(params, schedule=sched, kind=kind)
    state = opt.init(params)
    decayed = optim.weight_decay_mask(params)
    rate = jax.tree.map(lambda d: 0.1 if d else 0.0, decayed)
    for step in range(3):
        u, state = opt.update(zeros, state, params)
        expected = _times(jax.tree.map(lambda p, r: -p * r, params, rate), float(sched(step)))
        # one float32 multiply-add per element: rtol 1e-6
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u, expected)


def test_kind_adamw_has_no_muon_group_and_bad_kind_fails():
    params = _rng_tree(SHAPES, 0)
    state = make_optimizer(params, schedule=1e-3, kind="adamw").init(params)
    structure = repr(jax.tree.structure(state))  # names every NamedTuple state type
    assert "MuonState" not in structure and "ScaleByAdamState" in structure
    with pytest.raises(ValueError, match="kind must be"):
        make_optimizer(params, schedule=1e-3, kind="sgd")
    with pytest.raises(ValueError, match="adam_b2"):
        OptimConfig(adam_b2=1.0)
    with pytest.raises(ValueError, match="no optimizer rule"):
        optim.partition({"mystery": jnp.ones((2, 2))})
    opt = make_optimizer(params, schedule=1e-3)
    with pytest.raises(ValueError, match="needs params"):
        opt.update(params, opt.init(params))


# --------------------------------------------------------------------------- partition table

# (optimizer, weight decay?) per parameter of the tiny model; layer indices written as *.
# V4 report §2.4, §4.2.2: AdamW for embedding, head, RMSNorm weights, mHC S (base) and alpha
# (scale); our choice:
# AdamW without decay for attention sinks and compressor position biases (ape).
BLOCK = {
    "attn/attn_sink": ("adamw", False),
    "attn/kv_norm/weight": ("adamw", False),
    "attn/q_norm/weight": ("adamw", False),
    "attn/wkv/weight": ("muon", True),
    "attn/wo_a/weight": ("muon", True),
    "attn/wo_b/weight": ("muon", True),
    "attn/wq_a/weight": ("muon", True),
    "attn/wq_b/weight": ("muon", True),
    "attn_norm/weight": ("adamw", False),
    "ffn/experts/w1": ("muon", True),
    "ffn/experts/w2": ("muon", True),
    "ffn/experts/w3": ("muon", True),
    "ffn/gate/weight": ("muon", True),
    "ffn/shared_experts/w1/weight": ("muon", True),
    "ffn/shared_experts/w2/weight": ("muon", True),
    "ffn/shared_experts/w3/weight": ("muon", True),
    "ffn_norm/weight": ("adamw", False),
    "hc_attn/base": ("adamw", False),
    "hc_attn/fn": ("muon", True),
    "hc_attn/scale": ("adamw", False),
    "hc_ffn/base": ("adamw", False),
    "hc_ffn/fn": ("muon", True),
    "hc_ffn/scale": ("adamw", False),
}
COMPRESSED = {  # only in compressed-attention layers (ratio 4 has the indexer too)
    "attn/compressor/ape": ("adamw", False),
    "attn/compressor/norm/weight": ("adamw", False),
    "attn/compressor/wgate/weight": ("muon", True),
    "attn/compressor/wkv/weight": ("muon", True),
    "attn/indexer/compressor/ape": ("adamw", False),
    "attn/indexer/compressor/norm/weight": ("adamw", False),
    "attn/indexer/compressor/wgate/weight": ("muon", True),
    "attn/indexer/compressor/wkv/weight": ("muon", True),
    "attn/indexer/weights_proj/weight": ("muon", True),
    "attn/indexer/wq_b/weight": ("muon", True),
}
TOP = {
    "embed": ("adamw", True),
    "head/weight": ("adamw", True),
    "norm/weight": ("adamw", False),
    "hc_head/base": ("adamw", False),
    "hc_head/fn": ("muon", True),
    "hc_head/scale": ("adamw", False),
    "mtp/e_proj/weight": ("muon", True),
    "mtp/h_proj/weight": ("muon", True),
    "mtp/enorm/weight": ("adamw", False),
    "mtp/hnorm/weight": ("adamw", False),
    "mtp/norm/weight": ("adamw", False),
    "mtp/hc_head/base": ("adamw", False),
    "mtp/hc_head/fn": ("muon", True),
    "mtp/hc_head/scale": ("adamw", False),
}
EXPECTED = {
    **TOP,
    **{f"mtp/block/{k}": v for k, v in BLOCK.items()},
    **{f"segments/*/blocks/*/{k}": v for k, v in {**BLOCK, **COMPRESSED}.items()},
}


@pytest.fixture(scope="module")
def tiny_trainable():
    """The tiny model's trainable tree as float32 shapes: quantisation scales, router bias and
    hash table dropped, packed FP4 [.., O, I/2] int8 unpacked to [.., O, I]."""
    m = v4jax.init(v4jax.config.tiny(), numerics="bf16", dtype=jnp.float32)
    tree = {}
    for path, var in nnx.to_flat_state(m.state):
        x = var.get_value()
        if x.dtype == ml_dtypes.float8_e8m0fnu or path[-1] in ("bias", "tid2eid"):
            continue
        shape = x.shape[:-1] + (2 * x.shape[-1],) if x.dtype == np.int8 else x.shape
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return tree


def test_partition_table_of_tiny_model(tiny_trainable):
    labels = optim.partition(tiny_trainable)
    decay = optim.weight_decay_mask(tiny_trainable)
    got = {}
    for (path, lab), d in zip(
        jax.tree_util.tree_leaves_with_path(labels), jax.tree.leaves(decay), strict=True
    ):
        name = re.sub(r"/\d+/", "/*/", "/".join(str(getattr(k, "key", k)) for k in path))
        assert got.setdefault(name, (lab, d)) == (lab, d), name  # same in every layer
    assert set(got) == set(EXPECTED), set(got) ^ set(EXPECTED)
    wrong = {k: (got[k], v) for k, v in EXPECTED.items() if got[k] != v}
    assert not wrong, wrong


def test_state_shapes_for_tiny_model(tiny_trainable):
    schedule = flash_schedule(decay_start=3000, total=4000)
    for kind in ("muon", "adamw"):
        opt = make_optimizer(tiny_trainable, schedule=schedule, kind=kind)
        state = jax.eval_shape(opt.init, tiny_trainable)
        # Plain pytree: every leaf an array (abstractly), nothing else.
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)), kind
        upd, _ = jax.eval_shape(opt.update, tiny_trainable, state, tiny_trainable)
        assert jax.tree.structure(upd) == jax.tree.structure(tiny_trainable)
        groups = state[1].inner_states  # chain: (clip, partition, decay, lr schedule)
        assert set(groups) == ({"muon", "adamw"} if kind == "muon" else {"adamw"})
    # Muon momentum of a stacked expert leaf keeps its [L, E, O, I] shape.
    mu = jax.eval_shape(make_optimizer(tiny_trainable, schedule=schedule).init, tiny_trainable)
    mu = mu[1].inner_states["muon"].inner_state.mu
    assert mu["segments"][1]["blocks"][0]["ffn"]["experts"]["w2"].shape == (1, 8, 256, 128)


# --------------------------------------------------------------------------- state I/O, sharding


def test_state_orbax_roundtrip(tmp_path):
    params = _rng_tree(SHAPES, 0)
    opt = make_optimizer(params, schedule=1e-3)
    _, state = opt.update(_rng_tree(SHAPES, 1), opt.init(params), params)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "opt", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "opt", jax.eval_shape(lambda: state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_sharded_update_equals_unsharded():
    # Experts sharded over layers x experts (2 x 4 fake devices): both are NS batch axes.
    shapes = {"embed": (8, 16), "segments": {0: {"blocks": {0: {"ffn": {"experts": {}}}}}}}
    shapes["segments"][0]["blocks"][0]["ffn"]["experts"]["w1"] = (2, 4, 16, 48)
    p, g = _rng_tree(shapes, 0), _rng_tree(shapes, 1)
    mesh = jax.make_mesh((2, 4), ("layers", "experts"))
    spec = lambda x: P("layers", "experts") if x.ndim == 4 else P()
    put = lambda t: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), t)
    opt = make_optimizer(p, schedule=1e-3)
    state = opt.init(p)
    step = jax.jit(opt.update)
    want, _ = step(g, state, p)
    got, new_state = step(put(g), put(state), put(p))
    mu = new_state[1].inner_states["muon"].inner_state.mu
    w1 = mu["segments"][0]["blocks"][0]["ffn"]["experts"]["w1"]
    assert w1.sharding.is_equivalent_to(NamedSharding(mesh, spec(w1)), w1.ndim)
    # Same float32 ops per shard; only the global-norm reduction order can differ.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), got, want)


# --------------------------------------------------------------------------- schedule


def test_schedule_values():
    s = flash_schedule(decay_start=10_000, total=12_000)
    peak, final = 2.7e-4, 2.7e-5  # V4 report §4.2.2
    expected = {
        0: peak / 2000,  # first warm-up step: peak * 1 / 2000
        999: peak / 2,
        1999: peak,  # warm-up reaches the peak on its last step
        2000: peak,
        9999: peak,
        10_000: peak,  # cosine starts at the peak
        11_000: (peak + final) / 2,  # cosine midpoint
        12_000: final,
        50_000: final,
    }
    jit_s = jax.jit(s)
    for step, lr in expected.items():  # float32 arithmetic: rtol 1e-6
        np.testing.assert_allclose(float(s(step)), lr, rtol=1e-6, err_msg=str(step))
        np.testing.assert_allclose(float(jit_s(jnp.int32(step))), lr, rtol=1e-6)
    assert not bool(s.in_decay(9999)) and bool(jax.jit(s.in_decay)(10_000))
    assert float(s.mtp_weight(9999)) == pytest.approx(0.3)
    assert float(s.mtp_weight(10_000)) == pytest.approx(0.1)
    pro = pro_schedule(decay_start=3000, total=4000)
    assert (pro.peak, pro.final, pro.warmup) == (2.0e-4, pytest.approx(2.0e-5), 2000)
    with pytest.raises(ValueError, match="warmup <= decay_start < total"):
        LRSchedule(peak=1e-3, warmup=10, decay_start=5, total=20)
    with pytest.raises(ValueError, match="peak"):
        LRSchedule(peak=0.0, decay_start=5000, total=6000)


@pytest.mark.parametrize(
    "shape, stored, moved",
    [
        # V4-Pro's case in small: 3 experts per expert rank x 3 layers = 9 matrices per device,
        # which fsdp=4 does not divide: padded to 12, 3 whole matrices per device
        ((3, 6, 16, 48), P(None, "expert", None, "fsdp"), [("all-to-all", (3, 16, 48))]),
        # one matrix split both ways: gathered (spreading 1 matrix would send more)
        ((16, 48), P("fsdp", "expert"), [("all-gather", (1, 16, 24)), ("all-gather", (16, 48))]),
        # two axes on one dim, the minor one (expert) first so the pieces join in order:
        # 3 matrices gathered over expert=2, then padded to 4 and spread over fsdp=4
        (
            (3, 16, 48),
            P(None, ("fsdp", "expert"), None),
            [("all-gather", (3, 4, 48)), ("all-to-all", (1, 16, 48))],
        ),
    ],
)
def test_owner_layout_pads_a_stack_no_axis_divides(shape, stored, moved):
    """Muon's owner layout on `fsdp=4 x expert=2` for leaves whose stack no mesh axis divides:
    each device pads its own stack with zero matrices and all-to-alls it, there and back, or
    where it holds too few matrices to spread, the axis's group gathers them (`spread`):
    the collectives' bytes are those of the results `moved` (an all-to-all's twice), with no
    all-reduce (the computation runs on whole matrices only); the result equals the
    computation on the unsharded stack (1e-5: the same float32 ops per matrix, in batched
    matmuls of another batch size)."""
    import sharding
    from sharding.train_plan import collective_bytes

    x = jax.random.normal(jax.random.key(3), shape, jnp.float32)
    mesh = sharding.make_mesh("fsdp=4 x expert=2")
    # Newton-Schulz commutes with permuting rows / columns, so a cumulative sum over rows is
    # added: it sees the matrices' rows out of order, if the exchanges put them so
    per = lambda y: newton_schulz(y) + jnp.cumsum(y, axis=-2)
    want = per(x)

    def run(x):
        with sharding.use_rules(mesh, "train"):
            return sharding.constraints.per_matrix(per, x, "owner", stored)

    fn = jax.jit(run, out_shardings=NamedSharding(mesh, stored))
    xs = jax.device_put(x, NamedSharding(mesh, stored))
    coll, _ = collective_bytes(fn.lower(xs).compile().as_text())
    want_bytes = {"all-gather": 0, "all-to-all": 0, "all-reduce": 0}
    for kind, result in moved:
        want_bytes[kind] += 4 * math.prod(result) * (2 if kind == "all-to-all" else 1)
    assert {k: coll[k] for k in want_bytes} == want_bytes, coll
    np.testing.assert_allclose(fn(xs), want, rtol=1e-5, atol=1e-6)


def test_owner_layout_moves_only_the_own_share_on_a_context_mesh():
    """Muon on `context=2 x fsdp=2 x expert=2` (TRAIN) with the stored specs declared, as the
    train step declares them: an expert stack stored [expert, context, fsdp] is orthogonalised
    whole matrices per device, reached by all-to-alls (no all-gather of the leaf, and no
    all-reduce: Newton-Schulz does not run on the stored shards), and the
    update equals the unsharded one (same float32 ops per matrix; 1e-5: the global norm's
    summation order)."""
    import sharding
    from sharding.train_plan import collective_bytes

    shapes = {"segments": {0: {"blocks": {0: {"ffn": {"experts": {"w1": (2, 8, 16, 48)}}}}}}}
    p, g = _rng_tree(shapes, 0), _rng_tree(shapes, 1)
    mesh = sharding.make_mesh("context=2 x fsdp=2 x expert=2")
    stored = P(None, "expert", "context", "fsdp")
    put = lambda t: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, stored)), t)
    opt = make_optimizer(p, schedule=1e-3)
    want, _ = jax.jit(opt.update)(g, opt.init(p), p)
    table = optim.spec_table(jax.tree.map(lambda _: NamedSharding(mesh, stored), p))
    assert table == {("segments", "0", "blocks", "0", "ffn", "experts", "w1"): stored}

    def update(g, s, p):
        with sharding.use_rules(mesh, "train"), sharding.constraints.stored_specs(table):
            return opt.update(g, s, p)

    fn = jax.jit(update)
    args = (put(g), jax.tree.map(put, opt.init(p)), put(p))
    coll, _ = collective_bytes(fn.lower(*args).compile().as_text())
    leaf = 2 * 8 * 16 * 48 * 4 // 8  # one device's share of the leaf, bytes
    assert coll["all-gather"] == 0 and coll["all-to-all"] >= 2 * leaf, coll
    assert coll["all-reduce"] <= 64, coll  # the clipping norm's scalars; no GSPMD matmuls
    got, _ = fn(*args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), got, want)
