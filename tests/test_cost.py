"""The jaxpr cost counter (`v4jax/cost.py`): matmul FLOPs, loop trip counts, branches,
shard_map, parameter bytes read, and a tiny V4 forward against an analytic formula.

Expected values are written from shapes by hand (or from XLA's cost analysis, for a program
without loops, where it is exact); counts are sums of integers below 2^53, so equality is exact.
"""

import contextlib
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import v4jax
from v4jax import api, cost
from v4jax.decode import init_cache, steps
from v4jax.model import experts
from v4jax.numerics import Numerics, Precision

S = jax.ShapeDtypeStruct
F32 = jnp.float32


def mm_flops(m, k, n):
    return 2 * m * k * n


def test_matmul_flops_exact_and_agrees_with_xla():
    x, w = S((32, 48), F32), S((48, 80), F32)
    r = cost.count(lambda x, w: x @ w, x, w)
    assert r.flops == mm_flops(32, 48, 80)
    # no loops here: XLA's own count is an independent oracle
    xla = jax.jit(lambda x, w: x @ w).lower(x, w).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    assert r.flops == xla["flops"]
    b = cost.count(
        lambda a, c: jnp.einsum("bij,bjk->bik", a, c), S((3, 5, 7), F32), S((3, 7, 11), F32)
    )
    assert b.flops == 3 * mm_flops(5, 7, 11)
    assert b.by() == {"other": b.flops}  # not v4jax code: the fallback component


def test_ragged_dot_counts_each_row_once():
    m, k, n, g = 64, 32, 16, 4
    r = cost.count(
        lambda x, w, s: jax.lax.ragged_dot(x, w, s),
        S((m, k), F32),
        S((g, k, n), F32),
        S((g,), jnp.int32),
    )
    assert r.flops == mm_flops(m, k, n)  # not g times (the CPU decomposition's cost)


def _body(c, w):
    return jnp.tanh(c @ w), None


def test_scan_counts_length_like_unrolled():
    x, ws = S((8, 16), F32), S((10, 16, 16), F32)
    scanned = cost.count(lambda x, ws: jax.lax.scan(_body, x, ws)[0], x, ws, params=1)

    def unrolled(x, ws):
        for i in range(10):
            x, _ = _body(x, ws[i])
        return x

    plain = cost.count(unrolled, x, ws, params=1)
    assert scanned.flops == plain.flops == 10 * mm_flops(8, 16, 16)
    assert scanned.elementwise == plain.elementwise == 10 * 8 * 16  # tanh
    # each step reads its own slice of the stacked weights: all of them once
    assert scanned.weight_bytes == plain.weight_bytes == 10 * 16 * 16 * 4
    assert [lp.trips for lp in scanned.loops.values()] == [10]


def test_nested_scans_multiply():
    def f(x):
        def outer(c, _):
            return jax.lax.scan(lambda d, _: (d @ d, None), c, None, length=4)[0], None

        return jax.lax.scan(outer, x, None, length=3)[0]

    r = cost.count(f, S((8, 8), F32))
    assert r.flops == 12 * mm_flops(8, 8, 8)
    (outer, inner) = sorted(r.loops)
    assert r.loops[inner].parent == outer and r.loops[inner].trips == 4
    assert {rec.loops for rec in r.records if rec.flops} == {(outer, inner)}


def test_cond_counts_most_expensive_branch():
    def f(p, x):
        return jax.lax.cond(p > 0, lambda a: a @ a @ a, lambda a: a @ a, x)

    r = cost.count(f, S((), F32), S((8, 8), F32))
    assert r.flops == 2 * mm_flops(8, 8, 8)
    assert any("most expensive of 2 branches" in n for n in r.notes)


def test_fori_loop_static_and_dynamic_trip_counts():
    body = lambda i, c: c @ c  # noqa: E731
    x = S((8, 8), F32)
    one = mm_flops(8, 8, 8)
    lowered_to_scan = cost.count(lambda x: jax.lax.fori_loop(0, 7, body, x), x)
    static_while = cost.count(lambda x: jax.lax.fori_loop(jnp.int32(2), jnp.int32(9), body, x), x)
    assert lowered_to_scan.flops == static_while.flops == 7 * one
    assert [lp.kind for lp in static_while.loops.values()] == ["while"]
    stepped = cost.count(
        lambda x: jax.lax.while_loop(
            lambda c: c[0] < 10, lambda c: (c[0] + 3, c[1] @ c[1]), (1, x)
        ),
        x,
    )
    assert stepped.flops == 3 * one  # i = 1, 4, 7
    dynamic = cost.count(lambda x, n: jax.lax.fori_loop(0, n, body, x), x, S((), jnp.int32))
    assert dynamic.flops == one and any("no static trip count" in n for n in dynamic.notes)
    assert [lp.trips for lp in dynamic.loops.values()] == [None]


def test_shard_map_counts_every_device():
    mesh = jax.make_mesh((4,), ("d",), devices=jax.devices()[:4])
    sh = NamedSharding(mesh, P("d"))
    x, w = S((16, 32), F32, sharding=sh), S((32, 8), F32)

    def f(x, w):  # rows split over 4 devices, w replicated: every device reads all of w
        return jax.shard_map(
            lambda a, b: a @ b, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d")
        )(x, w)

    r = cost.count(f, x, w, params=(0, 1))
    assert r.flops == mm_flops(16, 32, 8)  # 4 devices x 4 rows each
    read = r.by("weight_bytes", key=lambda rec: rec.leaf)
    assert read == {"0": 16 * 32 * 4, "1": 4 * 32 * 8 * 4}


def _dequant_matmul(x, w, s, ids):
    """Stacked FP8 weights [E, D, F] with per-expert scales [E]: the rows `ids` (or all)."""
    if ids is not None:
        w, s = jnp.take(w, ids, axis=0), jnp.take(s, ids, axis=0)
    wf = w.astype(F32) * s.astype(F32)[:, None, None]
    return jnp.einsum("td,edf->etf", x, wf)


def test_weight_bytes_of_gathered_and_dense_experts():
    e, d, f, k = 16, 64, 32, 3
    x, w, s = S((2, d), F32), S((e, d, f), jnp.float8_e4m3fn), S((e,), jnp.float8_e8m0fnu)
    ids = S((k,), jnp.int32)
    every = e * d * f + e  # bytes of both leaves (1-byte types)
    dense = cost.count(lambda x, w, s: _dequant_matmul(x, w, s, None), x, w, s, params=(1, 2))
    assert dense.weight_bytes == every
    taken = cost.count(_dequant_matmul, x, w, s, ids, params=(1, 2))
    assert taken.weight_bytes == k * (d * f + 1)  # through the convert / multiply / einsum
    assert taken.by("weight_bytes", key=lambda r: r.leaf) == {"1": k * d * f, "2": k}

    def per_tile(x, w, s, e_of_tile):  # 5 tiles, each dynamic_slices one expert
        def body(c, ei):
            wi = jax.lax.dynamic_index_in_dim(w, ei, 0, False).astype(F32)
            return c + jnp.sum(x @ wi), None

        return jax.lax.scan(body, 0.0, e_of_tile)[0]

    tiles = cost.count(per_tile, x, w, s, S((5,), jnp.int32), params=(1, 2))
    assert tiles.weight_bytes == 5 * d * f  # s is never used


def test_named_scope_is_the_component():
    def f(x, w):
        with jax.named_scope("my block"):
            y = x @ w
        return y @ w.T

    r = cost.count(f, S((4, 8), F32), S((8, 8), F32))
    assert r.by() == {"my block": mm_flops(4, 8, 8), "other": mm_flops(4, 8, 8)}


def test_bad_arguments():
    with pytest.raises(ValueError, match="argument numbers"):
        cost.count(lambda x: x, S((2,), F32), params=3)
    closed = jax.make_jaxpr(lambda x: x)(S((2,), F32))
    with pytest.raises(ValueError, match="leaf descriptions"):
        cost.count_jaxpr(closed, [])


# ------------------------------------------------------------------------------------------
# The tiny V4 model


def _impl(name):
    switch = getattr(experts, "implementation", None)
    return switch(name) if switch is not None else contextlib.nullcontext()


def tiny_param_flops(c, t):
    """FLOPs of the parameter matmuls (and the mHC / Hadamard products) of a t-token prefill
    with every routed expert on every token (the dense specification), per component."""
    d, h, k, q, n = c.dim, c.num_heads, c.head_dim, c.q_lora_rank, c.hc_mult
    ih, ik, ffn = c.index_heads, c.index_head_dim, 3 * d * c.moe_inter_dim
    out = dict.fromkeys(
        ("attention", "compressor", "indexer", "router", "routed experts", "shared expert"), 0.0
    )
    out["mhc"] = 2 * t * n * n * d  # hc_head
    out["head"] = 2 * t * d * c.vocab_size
    for r in c.layer_ratios:
        attn = d * q + q * h * k + d * k + c.o_lora_rank * h * k + c.o_groups * c.o_lora_rank * d
        out["attention"] += 2 * t * attn
        out["router"] += 2 * t * d * c.num_experts
        out["routed experts"] += 2 * t * ffn * c.num_experts
        out["shared expert"] += 2 * t * ffn
        out["mhc"] += 2 * 2 * t * (c.mix_hc * n * d + n * n * d)  # mixes + stream mixing, 2 sites
        if r:
            out["compressor"] += 2 * t * 2 * d * (2 if r == 4 else 1) * k
        if r == 4:  # projections, own compressor, Hadamard of queries and keys
            hadamard = 2 * (t * ih + t // 4) * ik * ik
            out["indexer"] += 2 * t * (q * ih * ik + d * ih + 2 * d * 2 * ik) + hadamard
    return out


def test_tiny_v4_forward_matches_analytic_formula():
    cfg, t = v4jax.config.tiny(), 128  # window 16, CSA 32 entries (top-8), HCA 1 entry
    prec = Precision(Numerics.REFERENCE, jnp.bfloat16)
    graphdef, state = api._abstract(cfg, prec, "auto")
    with _impl("dense"):
        tokens = S((1, t), jnp.int32)
        # fresh: an earlier test may have traced this model under another expert path
        r = cost.count(
            api._logits, graphdef, state, tokens, params=1, static_argnums=(0,), fresh=True
        )
    got, params = r.by(), tiny_param_flops(cfg, t)
    assert set(got) == {*params, "attention core", "indexer scores"}  # no FLOPs unattributed
    for comp, want in params.items():
        assert got.get(comp, 0.0) == want, comp
    # attention scores + P.V and indexer scores: at least the visible entries of each query,
    # at most every entry of its index list (window min(t, W) + CSA top-k / HCA all entries)
    hk, pos = 4 * cfg.num_heads * cfg.head_dim, np.arange(1, t + 1)
    lo = hi = 0
    for r_ in cfg.layer_ratios:
        lo += hk * np.minimum(pos, cfg.window_size).sum()
        hi += hk * t * min(t, cfg.window_size)
        if r_ == 4:
            lo += hk * np.minimum(pos // 4, cfg.index_topk).sum()
            hi += hk * t * min(cfg.index_topk, t // 4)
        elif r_ == 128:
            lo, hi = lo + hk * (pos // 128).sum(), hi + hk * t * (t // 128)
    assert lo <= got["attention core"] <= hi
    scores = 2 * cfg.index_heads * cfg.index_head_dim * sum(1 for r_ in cfg.layer_ratios if r_ == 4)
    assert scores * (pos // 4).sum() <= got["indexer scores"] <= scores * t * (t // 4)
    # so the total is the formula's to within the entries an index list may hold beyond the
    # visible ones (the stated margin: 0.27% of the total here)
    lo, hi = lo + scores * (pos // 4).sum(), hi + scores * t * (t // 4)
    assert sum(params.values()) + lo <= r.flops <= sum(params.values()) + hi
    # every parameter the forward uses is read whole (dense experts), the MTP block not at all
    read = r.by("weight_bytes", key=lambda rec: rec.leaf)
    for name, nbytes in r.leaf_bytes.items():
        want = 0 if name.startswith("mtp.") else nbytes
        if name in ("embed", *(n for n in r.leaf_bytes if n.endswith("tid2eid"))):
            continue  # rows gathered by token id: checked in the decode test
        assert read.get(name, 0) == want, name


@pytest.mark.skipif(not hasattr(experts, "implementation"), reason="no gather path yet")
def test_tiny_decode_step_reads_only_active_experts():
    cfg = v4jax.config.tiny()
    prec = Precision(Numerics.REFERENCE, jnp.bfloat16)
    graphdef, state = api._abstract(cfg, prec, "auto")
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, 64, prec.dtype))
    args = (graphdef, state, S((1, 1), jnp.int32), cache, S((1,), jnp.int32))
    with experts.implementation("gather"):
        r = cost.count(steps._chunk, *args, params=1, static_argnums=(0,), fresh=True)
    read = r.by("weight_bytes", key=lambda rec: rec.leaf)
    frac = cfg.experts_per_token / cfg.num_experts
    for name, nbytes in r.leaf_bytes.items():
        if name.startswith("mtp."):
            assert name not in read  # the MTP block is not part of a decode step
        elif ".experts." in name:
            assert read[name] == frac * nbytes, name
        elif name == "embed" or name.endswith("tid2eid"):
            assert read[name] == nbytes / cfg.vocab_size, name


def _bench_script():
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_flops.py"
    spec = importlib.util.spec_from_file_location("bench_flops", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not hasattr(experts, "implementation"), reason="no grouped path yet")
def test_bench_ideal_matches_grouped_tiny_forward():
    """scripts/bench_flops.py's ideal formula against the traced tiny forward with grouped
    expert matmuls (each token meets its k experts once), component by component."""
    bench, cfg, t = _bench_script(), v4jax.config.tiny(), 128
    prec = Precision(Numerics.REFERENCE, jnp.bfloat16)
    graphdef, state = api._abstract(cfg, prec, "auto")
    with experts.implementation("ragged"):
        r = cost.count(
            api._logits,
            graphdef,
            state,
            S((1, t), jnp.int32),
            params=1,
            static_argnums=(0,),
            fresh=True,
        )
    got, ideal = bench.scale_to_full(r, cfg, cfg), bench.ideal_full(cfg, t)
    assert got == r.by()  # the tiny model is its own "full" model: scaling by 1
    for comp in ("attention", "compressor", "router", "routed experts", "shared expert", "mhc"):
        assert got[comp] == ideal[comp], comp
    assert got["head"] == ideal["head"]
    # the indexer also multiplies queries and keys by a dense Hadamard matrix [K, K]
    csa = sum(1 for r_ in cfg.layer_ratios if r_ == 4)
    hadamard = csa * 2 * (t * cfg.index_heads + t // 4) * cfg.index_head_dim**2
    assert got["indexer"] == ideal["indexer"] + hadamard
    # the XLA reference attends over its whole index list: never fewer entries than ideal
    assert got["attention core"] >= ideal["attention core"]
    assert got["indexer scores"] >= ideal["indexer scores"]
