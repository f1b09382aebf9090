"""scripts/bench_train.py's pieces that need no compile: the ideal FLOP formula, the Muon
hand count, the remat-aware component rule, and refusing bad arguments in one line."""

import argparse
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

import v4jax
from v4jax import cost
from v4jax.train import optim


def _script():
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _script()


def test_ideal_counts_mtp_and_a_forward_only_indexer():
    cfg, b, s = v4jax.config.tiny(), 2, 32
    d, v, n = cfg.dim, cfg.vocab_size, cfg.hc_mult
    got = bench.ideal(cfg, b, s)
    fwd, train = got["forward"], got["train"]
    # head: the main model on S positions and the MTP on S - 1, fwd + bwd (2 + 4 per weight)
    assert train["head"] == 6 * d * v * b * (s + s - 1)
    # the only matmuls under norms/residual: MTP e_proj on the embedding and h_proj on each of
    # the n streams, [D, D] each
    assert train["norms/residual"] == 6 * d * d * b * (s - 1) * (1 + n)
    # the indexer is not trained at indexer weight 0: forward only; everything else x 3
    for comp in fwd:
        assert train[comp] == fwd[comp] * (1 if comp.startswith("indexer") else 3), comp
    # shared expert: 3 [D, F] matrices per block, in every main layer and in the MTP block
    ffn = 3 * d * cfg.moe_inter_dim
    assert fwd["shared expert"] == 2 * ffn * b * (cfg.num_layers * s + s - 1)


def test_newton_schulz_hand_count_matches_the_traced_update():
    # names that `optim.partition` sends to Muon: linear-map leaves ("weight", "w1"), one
    # stacked [E, O, I] and one tall matrix (transposed by Newton-Schulz)
    params = {
        "a": {"weight": jax.ShapeDtypeStruct((16, 40), jnp.float32)},
        "b": {"w1": jax.ShapeDtypeStruct((3, 24, 8), jnp.float32)},
        "norm": {"weight": jax.ShapeDtypeStruct((16,), jnp.float32)},  # AdamW
    }
    opt = optim.make_optimizer(params, schedule=1e-3)
    state = jax.eval_shape(opt.init, params)
    report = cost.count(opt.update, params, state, params)
    rows = len(optim.OptimConfig().muon_ns_coeffs)
    # per row: X X^T, G G and (..) X on [m, n] with m <= n: 2 m^2 n + 2 m^3 + 2 m^2 n
    by_hand = rows * ((4 * 16 * 16 * 40 + 2 * 16**3) + 3 * (4 * 8 * 8 * 24 + 2 * 8**3))
    assert bench.newton_schulz_flops(params, rows) == by_hand
    assert report.flops == by_hand  # Adam and weight decay have no matmul


def test_remat_call_does_not_impose_its_component():
    """Block remat in the model: the checkpoint call's component (its call site) must not be
    pinned on the recomputed forward and the backward inside it, and JAX's own
    "rematted_computation" scope is no component; the count is unchanged, only attributed."""

    def block(w, x):
        h = jnp.tanh(x @ w)  # no scope of its own (JAX scopes its recomputation)
        with jax.named_scope("inner"):
            return jnp.tanh(h @ w) @ w

    def loss(w, x):
        with jax.named_scope("outer"):
            y = jax.checkpoint(block)(w, x)
        return jnp.sum(y)

    args = (jax.ShapeDtypeStruct((8, 8), jnp.float32), jax.ShapeDtypeStruct((4, 8), jnp.float32))
    closed = jax.make_jaxpr(jax.grad(loss, argnums=0))(*args)
    plain = cost.count_jaxpr(closed, [None, None])
    ours = cost.count_jaxpr(closed, [None, None], classify=bench.classify)
    one = 2 * 4 * 8 * 8  # FLOPs of one [4, 8] x [8, 8] matmul
    # forward 3; recomputed 2 (the last product is not needed by the backward); backward 5
    # (2 per inner product: d input and d w; the first product only d w, x is not an argnum)
    assert plain.flops == ours.flops == 10 * one
    assert plain.by()["inner"] == 2 * one  # the call site's "outer" took the rest
    assert ours.by()["inner"] == 7 * one  # 2 forward + 1 recomputed + 4 backward
    assert bench.REMAT_SCOPE not in ours.by()


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"preset": "flash"}, "--preset"),
        ({"batch": 0}, "--batch"),
        ({"seq_len": 2}, "--seq-len"),
        ({"policies": ["none", "all"]}, "remat='all'"),
        ({"policies": ["block", "block"]}, "repeated"),
        ({"optimizer": "sgd"}, "--optimizer"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(change, needle):
    a = vars(bench._args([])) | change
    with pytest.raises(ValueError) as e:
        bench._check(argparse.Namespace(**a))
    assert needle in str(e.value) and "\n" not in str(e.value)
