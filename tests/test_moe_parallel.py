"""Expert parallelism with all-to-all dispatch (`v4jax/model/moe_parallel.py`) on 8 fake CPU
devices: equal to the unsharded MoE, and moving ~T k D activations per layer instead of the
gather dispatch's T D per rank.

Equality is float32 (`Precision(Numerics.BF16, jnp.float32)`) against `expert_sum`, the dense
specification: every step is row-local except the matmuls, and each token's outputs are summed
in the specification's order. XLA:CPU's matmul gives a row the same bits whatever the other rows
(`experts.py` docstring) except for a single-row matmul (a matrix-vector kernel), so the expert
layer is checked bitwise for T >= 2 (this is what catches a wrong combine order, k = 4 here:
reordering a sum moves it by an ulp); elsewhere 1e-6 relative, a few float32 ulps of the largest
output (a wrong row, expert or weight moves outputs by O(1)).
"""

from __future__ import annotations

import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import sharding
import v4jax
from v4jax.model.experts import combine_weights, expert_sum
from v4jax.model.moe import MoE, RoutedExperts
from v4jax.model.moe_parallel import buffer, dispatch, expert_parallel, ragged_all_to_all_dense
from v4jax.numerics import Numerics, Precision

PREC = Precision(Numerics.BF16, jnp.float32)
CFG = v4jax.config.tiny(experts_per_token=4)  # E = 8, k = 4 (order matters), D = 256, F = 128
E, K, D = CFG.num_experts, CFG.experts_per_token, CFG.dim
REL = 1e-6  # module docstring


def _fill(module: nnx.Module, seed: int) -> None:
    """Random values in every parameter's release format (E8M0 scales 2^-6..2^-4 keep the
    expert activations O(1), below the SwiGLU clamp)."""
    rng = np.random.default_rng(seed)
    for _, v in nnx.to_flat_state(nnx.state(module)):
        a = v.get_value()
        if a.dtype == jnp.int8:  # packed FP4
            val = jnp.asarray(rng.integers(-128, 128, a.shape), jnp.int8)
        elif a.dtype == jnp.float8_e8m0fnu:
            val = jnp.asarray(2.0 ** rng.integers(-6, -3, a.shape), jnp.float32).astype(a.dtype)
        elif a.dtype == jnp.int32:  # tid2eid
            val = jnp.asarray(rng.integers(0, E, a.shape), jnp.int32)
        else:
            val = jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32).astype(a.dtype)
        v.set_value(val)


def _experts(fmt: str, seed: int = 0):
    """Release-format routed experts as jit arguments (no weight constants in the HLO)."""
    ex = RoutedExperts(v4jax.config.tiny(expert_dtype=fmt), PREC)
    _fill(ex, seed)
    return ex.weights(), (ex.fmt, ex.prec, ex.limit)


def _stand_in(ws, meta):
    fmt, prec, limit = meta
    return types.SimpleNamespace(weights=lambda: ws, fmt=fmt, prec=prec, limit=limit)


@functools.partial(jax.jit, static_argnums=1)
def _want(ws, meta, x, w, top):
    """The specification: the dense scan over all experts, unsharded."""
    return expert_sum(x, combine_weights(w, top, E), ws, *meta)


def _sharded_fn(spec: str, rules: str, meta, impl: str | None = None, **kw):
    mesh = sharding.make_mesh(spec)

    def run(ws, x, w, top):
        with sharding.use_rules(mesh, rules):
            ex = sharding.mesh_axes("experts", E)
            return expert_parallel(_stand_in(ws, meta), x, w, top, ex, impl=impl, **kw)

    return jax.jit(run)


def _routings(t: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Routing weights / experts [t, k]: top-k of random scores; every token to experts 2-5 in
    random slot order (their ranks' receive buffers exactly full: each token sends its dropless
    bound min(k, E / n) rows to each); hash-like routing with repeated experts (merged, as
    `combine_weights` sums)."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.1, 1.0, (t, K)).astype(np.float32)
    top = np.argsort(rng.random((t, E)), axis=1)[:, :K].astype(np.int32)
    skew = (2 + np.argsort(rng.random((t, K)), axis=1)).astype(np.int32)
    repeat = rng.integers(0, E, (t, K)).astype(np.int32)
    repeat[::3, 1] = repeat[::3, 0]
    return {"random": (w, top), "skewed": (w, skew), "repeats": (w, repeat)}


def _kept(top: np.ndarray, n: int, cap: int) -> np.ndarray:
    """[t, k] which assignments a receive buffer of `cap` rows keeps, tokens split evenly
    over n expert ranks (TRAIN) and distinct experts per token, written from the bound's
    definition: receiver d takes the sources in rank order, each source's rows for d sorted
    by (expert, token, slot), and keeps the rows that land below `cap`."""
    t, k = top.shape
    per, n_local = t // n, E // n
    keep = np.ones((t, k), bool)
    for d in range(n):
        at = 0
        for s in range(n):
            rows = [(i, j) for i in range(s * per, (s + 1) * per) for j in range(k)]
            rows = sorted((r for r in rows if top[r] // n_local == d), key=lambda r: top[r])
            for m, r in enumerate(rows):
                keep[r] = at + m < cap
            at += len(rows)
    return keep


# ------------------------------------------------------------------ the exchange primitive


def _ragged_numpy(operands, outputs, in_off, send, out_off, recv):
    """`jax.lax.ragged_all_to_all`'s documented semantics over n ranks (its docstring)."""
    n = len(operands)
    results = [o.copy() for o in outputs]
    for src in range(n):
        for dst in range(n):
            rows = operands[src][in_off[src][dst] : in_off[src][dst] + send[src][dst]]
            at = out_off[src][dst]  # offsets on the receiver, chosen by the sender
            assert len(rows) == recv[dst][src]
            results[dst][at : at + len(rows)] = rows
    return results


def test_dense_exchange_follows_ragged_all_to_all_semantics():
    """The CPU exchange on a 2-axis group, with gaps between input slices and between output
    slices and an empty slice, against the documented `ragged_all_to_all` semantics."""
    n, rows, out_rows = 8, 24, 40  # slices of <= 2 rows: n (2 + 1) <= rows, n (2 + 2) <= out_rows
    rng = np.random.default_rng(0)
    send = rng.integers(0, 3, (n, n)).astype(np.int32)  # send[src][dst]
    send[1, 5] = 0
    in_off = np.cumsum(send + 1, axis=1) - (send + 1)  # one unused row after each slice
    recv = send.T.copy()  # recv[dst][src]
    at = np.cumsum(recv + 2, axis=1) - (recv + 2)  # receiver-side offsets, gaps of 2
    out_off = at.T.copy()  # out_off[src][dst] = where src's slice lands on dst
    operands = rng.standard_normal((n, rows, 3)).astype(np.float32)
    outputs = np.full((n, out_rows, 3), -7.0, np.float32)
    want = np.stack(_ragged_numpy(operands, outputs, in_off, send, out_off, recv))

    mesh = sharding.make_mesh("expert=4 x tensor=2")
    ax = ("expert", "tensor")
    body = lambda *a: ragged_all_to_all_dense(*(b[0] for b in a), axis_name=ax)[None]  # noqa: E731
    f = jax.shard_map(body, mesh=mesh, in_specs=(P(ax),) * 6, out_specs=P(ax), check_vma=False)
    args = (operands, outputs, in_off, send, out_off, recv)
    got = np.asarray(jax.jit(f)(*(jnp.asarray(a) for a in args)))
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------- sharded == unsharded


@pytest.mark.parametrize(
    "spec, fmt", [("expert=8", "fp4"), ("expert=4 x tensor=2", "fp8"), ("data=2 x expert=4", "fp4")]
)
@pytest.mark.parametrize("rules", ["train", "decode"])
def test_all_to_all_equals_unsharded(spec, fmt, rules):
    """Tokens split over the expert axes (TRAIN), replicated over them (DECODE: the reduce
    split), over data only ('data=2 x expert=4' DECODE); random, skewed and repeated routing
    through one compiled program (the dense exchange that CPUs select automatically):
    bitwise equal (module docstring)."""
    ws, meta = _experts(fmt)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((24, D)), jnp.float32)
    f = _sharded_fn(spec, rules, meta)
    for name, (w, top) in _routings(24, seed=2).items():
        want = np.asarray(_want(ws, meta, x, w, top))
        got = np.asarray(f(ws, x, w, top))
        np.testing.assert_array_equal(got, want, err_msg=f"{spec} {rules} {name}")


@pytest.mark.parametrize("t", [1, 3])
def test_fewer_tokens_than_ranks(t):
    """Decode-sized batches: 1 or 3 tokens over 8 expert ranks (tokens unsplit, most ranks
    send nothing). t = 1: the specification's single-row matmul is a matrix-vector kernel,
    so REL; t = 3: bitwise."""
    ws, meta = _experts("fp4", seed=3)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((t, D)), jnp.float32)
    w, top = _routings(t, seed=5)["random"]
    got = np.asarray(_sharded_fn("expert=4 x tensor=2", "train", meta)(ws, x, w, top))
    want = np.asarray(_want(ws, meta, x, w, top))
    assert np.abs(got - want).max() <= (REL if t == 1 else 0.0) * np.abs(want).max()


def test_dispatch_context_and_bad_impl():
    """`dispatch("gather")` selects the all-gather path (the same numbers, other collectives);
    an unknown implementation is a one-line error."""
    ws, meta = _experts("fp8", seed=6)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((16, D)), jnp.float32)
    w, top = _routings(16, seed=8)["random"]
    f = _sharded_fn("expert=8", "train", meta)
    with dispatch("gather"):
        text = f.trace(ws, x, w, top).lower().as_text()
        got = np.asarray(f(ws, x, w, top))
    assert "all_gather" in text and "all_to_all" not in text
    want = np.asarray(_want(ws, meta, x, w, top))
    assert np.abs(got - want).max() <= REL * np.abs(want).max()
    with pytest.raises(ValueError, match="impl='ring'"):
        dispatch("ring").__enter__()


@pytest.mark.parametrize("factor", [1.0, 1.5, 8.0])
def test_bounded_buffer_drops_what_does_not_fit_and_counts_it(factor):
    """`buffer(factor)` on 'expert=8' (3 tokens per rank, k = 4: a balanced load is 12 rows, the
    bound rounds up to 8: 16 or 24 rows; dropless needs 8 x 3 = 24): the output equals the
    unsharded specification with the dropped assignments' weights set to 0, and the count
    equals the rows the bound's definition drops (`_kept`). Skewed routing (every token to
    experts 2-5) overflows ranks 2-5 below factor 2; at 8 nothing is dropped (bitwise
    dropless). Bitwise: the dropped slots add exact zeros in both."""
    ws, meta = _experts("fp8", seed=13)
    x = jnp.asarray(np.random.default_rng(14).standard_normal((24, D)), jnp.float32)
    f = _sharded_fn("expert=8", "train", meta, with_dropped=True)
    cap = min(24, -(-int(factor * 3 * K) // 8) * 8)
    total = 0
    for name, (w, top) in _routings(24, seed=15).items():
        if name == "repeats":
            continue  # _kept assumes distinct experts per token
        keep = _kept(top, 8, cap)
        with buffer(factor):
            got, dropped = f(ws, x, w, top)
        want = np.asarray(_want(ws, meta, x, np.where(keep, w, 0).astype(np.float32), top))
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
        assert float(dropped) == np.sum(~keep), name
        total += np.sum(~keep)
    if factor < 2:
        assert total >= 4 * (24 - cap)  # skewed: ranks 2-5 each receive 24 rows
    else:
        assert total == 0
    with pytest.raises(ValueError, match="buffer factor 0.5"):
        buffer(0.5).__enter__()


def test_hash_moe_layer_equals_unsharded():
    """A whole hash-routed MoE layer (router from tid2eid, shared expert) under both rules on
    'expert=4 x tensor=2' equals the unsharded layer; tid2eid rows repeat experts."""
    moe = MoE(CFG, hash_routed=True, prec=PREC)
    _fill(moe, seed=9)
    tid2eid = np.array(moe.gate.tid2eid[...])
    tid2eid[::4, 1] = tid2eid[::4, 0]
    moe.gate.tid2eid.set_value(jnp.asarray(tid2eid))
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.standard_normal((2, 12, D)), jnp.float32)
    ids = rng.integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
    ids[:, :4] = 0  # repeated tokens: repeated routes
    graph, state = nnx.split(moe)

    def run(state, x, ids):
        return nnx.merge(graph, state)(x, ids)

    want = np.asarray(jax.jit(run)(state, x, ids))
    mesh = sharding.make_mesh("expert=4 x tensor=2")
    for rules in ("train", "decode"):
        with sharding.use_rules(mesh, rules):
            got = np.asarray(jax.jit(run)(state, x, ids))
        assert np.abs(got - want).max() <= REL * np.abs(want).max(), rules


def test_gradients_equal_unsharded():
    """Training differentiates through both exchanges: d/dx and d/dw (routing weights) of a
    random projection of the output equal the specification's. The backward passes add a
    token's k contributions in another order than the dense scan's transpose; observed
    <= 4e-7 relative (a few float32 ulps), within REL."""
    ws, meta = _experts("fp8", seed=11)
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((16, D)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((16, D)), jnp.float32)
    w, top = _routings(16, seed=13)["random"]
    sharded = _sharded_fn("expert=4 x tensor=2", "train", meta)
    spec = lambda ws, x, w, top: _want(ws, meta, x, w, top)  # noqa: E731

    def grads(fn):
        loss = lambda x, w: jnp.sum(fn(ws, x, w, top) * r)  # noqa: E731
        return jax.jit(jax.grad(loss, (0, 1)))(x, w)

    for got, want in zip(grads(sharded), grads(spec), strict=True):
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel <= REL, f"relative difference {rel:.1e}"


# --------------------------------------------------------------------- traffic per layer

_BYTES = {"f32": 4, "i32": 4, "bf16": 2, "f8E4M3FN": 1, "i8": 1, "f8E8M0FNU": 1, "i1": 1}
_TENSOR = re.compile(r"tensor<((?:\d+x)*)(\w+)>")
_COLLECTIVE = re.compile(
    r'"stablehlo\.(all_gather|all_to_all|reduce_scatter|all_reduce|'
    r'collective_permute|collective_broadcast)"|@(ragged_all_to_all)\('
)


def _sizes(types_text: str) -> list[tuple[int, int]]:
    """(rows, bytes) of each `tensor<...>` in a signature fragment."""
    out = []
    for dims, dt in _TENSOR.findall(types_text):
        shape = [int(d) for d in dims.split("x") if d]
        out.append((shape[0] if shape else 1, int(np.prod(shape)) * _BYTES[dt]))
    return out


def collective_bytes(text: str) -> dict[str, int]:
    """Bytes per rank of each collective kind in StableHLO text (per-rank shapes inside the
    shard_map): all-gather its result; all-to-all, reduce-scatter, all-reduce their operands;
    ragged all-to-all the rows one rank's slices can hold, min(operand, output rows) x row
    bytes (dispatch: the rank's own assignments; return: the same rows coming back)."""
    lines, total = text.splitlines(), {}
    for i, line in enumerate(lines):
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        kind = m.group(1) or m.group(2)
        j = i
        if line.rstrip().endswith("({"):  # a region: the signature closes it
            indent = len(line) - len(line.lstrip())
            j = next(
                j for j in range(i + 1, len(lines)) if lines[j].startswith(" " * indent + "})")
            )
        args, result = re.search(r": \((.*)\) -> (.*)$", lines[j]).groups()
        ins, outs = _sizes(args), _sizes(result)
        if kind == "ragged_all_to_all":
            (r_in, b_in), (r_out, _) = ins[:2]
            b = min(r_in, r_out) * (b_in // r_in)
        else:
            b = sum(s for _, s in (outs if kind == "all_gather" else ins))
        total[kind] = total.get(kind, 0) + b
    return total


def test_all_to_all_moves_t_k_d_not_t_d_per_rank():
    """One MoE layer on 'expert=8' (TRAIN: tokens split over the expert ranks), lowered for
    GPU from this host: the ragged all-to-all moves each of the T k assignments there and
    back, 2 T k D floats per layer; the gather dispatch all-gathers T tokens onto each of the
    n ranks and reduce-scatters [T, D] partial sums, 2 n T D. CPU lowering picks the dense
    exchange (no ragged op)."""
    t, n = 64, 8
    ws, meta = _experts("fp4")
    rng = np.random.default_rng(14)
    x = jnp.asarray(rng.standard_normal((t, D)), jnp.float32)
    w, top = _routings(t, seed=15)["random"]
    lower = lambda impl, plat: (  # noqa: E731
        _sharded_fn("expert=8", "train", meta, impl)
        .trace(ws, x, w, top)
        .lower(lowering_platforms=(plat,))
        .as_text()
    )
    cuda = lower("auto", "cuda")
    assert cuda.count("@ragged_all_to_all(") == 3  # rows, (weight, expert) pairs, results
    assert "ragged_all_to_all" not in lower("auto", "cpu")
    new = {k: v * n for k, v in collective_bytes(cuda).items()}  # per layer: all 8 ranks
    old = {k: v * n for k, v in collective_bytes(lower("gather", "cuda")).items()}
    f32 = 4
    assert new == {
        "ragged_all_to_all": 2 * t * K * D * f32 + t * K * 2 * f32,  # rows out and back, meta
        "all_to_all": 4 * n * n * 4,  # int32 counts [n], then offsets and kept rows [n, 3]
    }
    assert old == {
        "all_gather": n * t * (D + 2 * K) * f32,  # x, w, top onto every rank
        "reduce_scatter": n * t * D * f32,  # [T, D] partial sums on every rank
    }
    assert sum(new.values()) < (K / n + 0.01) * sum(old.values())  # k / n, plus metadata
