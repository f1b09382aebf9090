"""Dropless grouped routed experts (`v4jax/model/experts.py`) against the dense specification
`expert_sum`: every path ("tiles", "gather", "ragged") in float32 and reference numerics, FP4
and FP8 experts, top-k and hash routing, edge cases, batch invariance, gradients, and the MoE
module's single-device branch.

Tolerances: "tiles" and "gather" are asserted bitwise on the CPU (each row's matmul runs in the
same XLA:CPU GEMM kernel as the dense path's, see the module docstring; T >= 2 so the dense path
is a GEMM too). `jax.lax.ragged_dot` on the CPU contracts over (groups x inputs) in one dot, so
its float32 summation order differs: 1e-6 relative to the output scale.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.config import tiny
from v4jax.model import experts as X
from v4jax.model.moe import MoE
from v4jax.numerics import Numerics, Precision

F32 = Precision(Numerics.BF16, jnp.float32)
REF = Precision()  # reference numerics: bf16 activations, FP8 activation simulation
D, F, LIMIT = 256, 128, 10.0  # D, F multiples of 128 (FP8 activation blocks)
CPU = jax.default_backend() == "cpu"


def expert_weights(rng, fmt: str, e: int):
    """Random (w1, s1, w2, s2, w3, s3) [E, ...]; fmt "f32": float32 master weights [E, O, I]
    (training; `layers.dequant` passes them through) with unused FP4-shaped scales."""
    ws = []
    for o, i in ((F, D), (D, F), (F, D)):
        if fmt == "fp4":
            w = jnp.asarray(rng.integers(-128, 128, (e, o, i // 2)), jnp.int8)
            s = 2.0 ** rng.integers(-7, -3, (e, o, i // 32))
        elif fmt == "fp8":
            w = jnp.asarray(rng.standard_normal((e, o, i)), jnp.float32).astype(jnp.float8_e4m3fn)
            s = 2.0 ** rng.integers(-8, -5, (e, -(-o // 128), -(-i // 128)))
        else:
            w = jnp.asarray(rng.standard_normal((e, o, i)) / np.sqrt(i), jnp.float32)
            s = np.ones((e, o, i // 32))
        ws += [w, jnp.asarray(s, jnp.float32).astype(jnp.float8_e8m0fnu)]
    return tuple(ws)


def routing(rng, t: int, e: int, k: int, hashed: bool = False):
    """Top-k: k distinct experts per token; hashed: rows of a random table (repeats allowed)."""
    if hashed:
        top = rng.integers(0, e, (t, k))
    else:
        top = np.argsort(rng.random((t, e)), axis=1)[:, :k]
    w = rng.uniform(0.1, 1.0, (t, k))
    return jnp.asarray(w / w.sum(1, keepdims=True) * 1.5, jnp.float32), jnp.asarray(top, jnp.int32)


@functools.cache
def _jitted(impl, fmt, prec):
    """One jit per (path, format, numerics), reused across tests."""
    fmt = "fp4" if fmt == "f32" else fmt

    def fn(x, w, top, ws):
        with X.implementation(impl):
            return X.routed_experts(x, w, top, ws, fmt, prec, LIMIT)

    return jax.jit(fn)


def run(impl, x, w, top, ws, fmt, prec):
    return np.asarray(_jitted(impl, fmt, prec)(x, w, top, ws))


def check(got, want, impl, prec):
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    if impl == "ragged" and prec is F32:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    elif impl == "ragged":
        # a float32 order change can flip a bf16 rounding of g / u, then an FP8 rounding of h:
        # rare elements move by up to ~2^-4 of an output; the rest stay bitwise.
        assert np.mean(got != want) <= 0.01
        np.testing.assert_allclose(got, want, rtol=0, atol=2**-4 * np.abs(want).max())
    elif CPU:
        np.testing.assert_array_equal(got, want)
    else:  # accelerators: no row-invariance guarantee for the matmul kernels
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("impl", ["tiles", "gather", "ragged"])
@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("prec", [F32, REF], ids=["f32", "ref"])
def test_paths_equal_dense(impl, fmt, prec):
    rng = np.random.default_rng(0)
    ws = expert_weights(rng, fmt, 8)
    w, top = routing(rng, 24, 8, 3)
    x = jnp.asarray(rng.standard_normal((24, D)), prec.dtype)
    want = run("dense", x, w, top, ws, fmt, prec)
    check(run(impl, x, w, top, ws, fmt, prec), want, impl, prec)


@pytest.mark.parametrize("impl", ["tiles", "gather"])
def test_hash_routing_repeats_and_out_of_range(impl):
    """Repeated experts in a row run once with the summed weight; ids outside [0, E) are not
    routed (both as `combine_weights` defines them)."""
    rng = np.random.default_rng(1)
    ws = expert_weights(rng, "fp4", 8)
    w, top = routing(rng, 16, 8, 4, hashed=True)
    top = top.at[0].set(jnp.array([2, 2, 2, 5])).at[1].set(jnp.array([-1, 8, 3, 3]))
    x = jnp.asarray(rng.standard_normal((16, D)), REF.dtype)
    want = run("dense", x, w, top, ws, "fp4", REF)
    check(run(impl, x, w, top, ws, "fp4", REF), want, impl, REF)


@pytest.mark.parametrize("impl", ["tiles", "gather", "auto"])
@pytest.mark.parametrize("case", ["one_expert", "t1", "most_empty"])
def test_edge_cases(impl, case):
    rng = np.random.default_rng(2)
    ws = expert_weights(rng, "fp8", 16)
    t = 1 if case == "t1" else 40
    w, top = routing(rng, t, 16, 2)
    if case == "one_expert":  # every token's first choice is expert 7: one group of 40 rows
        top = top.at[:, 0].set(7).at[:, 1].set(jnp.where(top[:, 1] == 7, 3, top[:, 1]))
    if case == "most_empty":  # experts 0 and 15 only: 14 empty groups
        top = jnp.broadcast_to(jnp.array([15, 0], jnp.int32), (t, 2))
    x = jnp.asarray(rng.standard_normal((t, D)), F32.dtype)
    got, want = run(impl, x, w, top, ws, "fp8", F32), run("dense", x, w, top, ws, "fp8", F32)
    if t == 1:  # the dense path's single row takes XLA's matrix-vector kernel: float32 order
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    else:
        check(got, want, impl, F32)


@pytest.mark.parametrize("prec", [F32, REF], ids=["f32", "ref"])
def test_expert_rows(prec):
    """Per-row outputs (the expert-parallel building block), unused rows (-1) exactly zero."""
    rng = np.random.default_rng(3)
    ws = expert_weights(rng, "fp4", 8)
    eid = jnp.asarray(rng.integers(-1, 8, 30), jnp.int32)
    cw = jnp.asarray(rng.uniform(0.1, 1, 30), jnp.float32)
    x = jnp.asarray(rng.standard_normal((30, D)), prec.dtype)
    out = {}
    for impl in ("dense", "tiles", "gather", "ragged"):
        with X.implementation(impl):
            out[impl] = np.asarray(
                jax.jit(X.expert_rows, static_argnums=(4, 5, 6))(x, eid, cw, ws, "fp4", prec, LIMIT)
            )
    unused = np.asarray(eid) < 0
    assert unused.any() and not out["dense"][unused].any()
    for impl in ("tiles", "gather", "ragged"):
        assert not out[impl][unused].any()
        check(out[impl], out["dense"], impl, prec)
    with pytest.raises(ValueError, match="mismatch"):
        X.expert_rows(x, eid[:-1], cw, ws, "fp4", prec, LIMIT)


@pytest.mark.parametrize(
    "impl, prec",
    [("auto", F32), ("auto", REF), ("tiles", REF), ("gather", REF)],
    ids=["auto-f32", "auto-ref", "tiles-ref", "gather-ref"],
)
def test_batch_invariance(impl, prec):
    """A token's output alone equals its output among 31 others (auto: gather alone, tiles in
    the batch). Bitwise on the CPU (module docstring)."""
    rng = np.random.default_rng(4)
    ws = expert_weights(rng, "fp4", 8)
    w, top = routing(rng, 32, 8, 2)
    x = jnp.asarray(rng.standard_normal((32, D)), prec.dtype)
    batch = run(impl, x, w, top, ws, "fp4", prec)
    for i in (0, 29):
        alone = run(impl, x[i : i + 1], w[i : i + 1], top[i : i + 1], ws, "fp4", prec)
        if CPU:
            np.testing.assert_array_equal(alone[0], batch[i])
        else:
            np.testing.assert_allclose(alone[0], batch[i], atol=1e-6 * np.abs(batch[i]).max())


@pytest.mark.parametrize("impl", ["tiles", "gather", "ragged"])
def test_gradients_equal_dense(impl):
    """d/dx, d/dw (routing weights) and d/d(float32 expert weights) of a random projection;
    backward sums (scatter-adds over a token's k rows, weight cotangents) change float32 order:
    1e-6 of each gradient's scale."""
    rng = np.random.default_rng(5)
    ws = expert_weights(rng, "f32", 4)
    w, top = routing(rng, 10, 4, 2)
    x = jnp.asarray(rng.standard_normal((10, D)), jnp.float32)
    proj = jnp.asarray(rng.standard_normal((10, D)), jnp.float32)

    def grads(name):
        def loss(x, w, ws):
            with X.implementation(name):
                return jnp.sum(proj * X.routed_experts(x, w, top, ws, "fp4", F32, LIMIT))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, ws)

    want, got = grads("dense"), grads(impl)
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    for g, r in [(g, r) for g, r in pairs if r.dtype == jnp.float32]:  # not the unused scales
        assert np.abs(r).max() > 0
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-6 * np.abs(r).max())


@pytest.mark.parametrize("impl", ["tiles", "gather"])
def test_unrouted_experts_are_not_read(impl):
    """NaN scales on every unrouted expert: the dense path multiplies them by 0 (NaN); the
    grouped paths never touch them."""
    rng = np.random.default_rng(6)
    ws = list(expert_weights(rng, "fp4", 16))
    w, top = routing(rng, 12, 16, 2)
    used = np.zeros(16, bool)
    used[np.asarray(top).ravel()] = True
    assert not used.all()
    nan = jnp.asarray(np.nan, jnp.float32).astype(jnp.float8_e8m0fnu)
    for i in (1, 3, 5):
        ws[i] = ws[i].at[~used].set(nan)
    x = jnp.asarray(rng.standard_normal((12, D)), REF.dtype)
    assert np.isnan(run("dense", x, w, top, tuple(ws), "fp4", REF)).any()
    assert np.isfinite(run(impl, x, w, top, tuple(ws), "fp4", REF)).all()


def test_moe_module_single_device_branch():
    """`MoE.__call__` (router, routed, shared) with random weights: auto == dense path."""
    cfg = tiny(num_experts=16, experts_per_token=4)
    graphdef, state = nnx.split(MoE(cfg, False, REF))
    rng = np.random.default_rng(7)

    def fill(a):
        if a.dtype == jnp.int8:
            return jnp.asarray(rng.integers(-128, 128, a.shape), jnp.int8)
        if a.dtype == jnp.float8_e8m0fnu:
            return jnp.asarray(2.0 ** rng.integers(-8, -5, a.shape), jnp.float32).astype(a.dtype)
        return jnp.asarray(rng.standard_normal(a.shape) * 0.1, jnp.float32).astype(a.dtype)

    state = jax.tree.map(fill, state)
    x = jnp.asarray(rng.standard_normal((2, 9, cfg.dim)), jnp.bfloat16)
    ids = jnp.zeros((2, 9), jnp.int32)
    out = {}
    for impl in ("dense", "auto"):
        with X.implementation(impl):
            out[impl] = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, ids))(state, x))
    assert np.isfinite(out["dense"]).all()
    np.testing.assert_array_equal(out["auto"], out["dense"])


def test_implementation_names():
    with pytest.raises(ValueError, match="implementation='fast'"):
        with X.implementation("fast"):
            pass
    with X.implementation("tiles"):
        assert X.choose(6, 256) == "tiles"
    assert X.choose(6, 256) == "gather"  # batch-1 decode: k rows << E experts
    assert X.choose(512 * 6, 256) == ("tiles" if CPU else "ragged")
    fn = jax.jit(lambda x: x + (X.choose(6, 256) == "gather"))
    assert fn(0.0) == 1.0
    with X.implementation("tiles"):
        assert fn(0.0) == 0.0  # part of jit's cache key: traced again
