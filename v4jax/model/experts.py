"""Routed-expert math shared by every MoE path (reference `Expert`, `MoE`).

`expert_sum` is the dense specification: a scan over experts in index order, each expert on
every token with its routing weight (0 for tokens not routed to it). It reproduces the
reference's float32 accumulation order exactly and costs E / k times the routed FLOPs.

The fast paths run each expert only on the rows routed to it (dropless: no capacity, no
dropped tokens) and must equal the specification:
- "tiles" (CPU): the (row, expert) assignments sorted by expert, each group padded to row tiles,
  a `lax.scan` over a static bound of tiles whose unused tiles are skipped (`lax.cond`); each
  tile dequantises its expert next to its matmul.
- "ragged" (GPU / TPU): `tokamax.ragged_dot` (Pallas grouped matmul) on the sorted rows,
  `jax.lax.ragged_dot` as the fallback. On CPU XLA decomposes it into a dense matmul over all
  groups (g times the useful FLOPs), so it is only tested there, never chosen.
- "gather" (decode, few rows): each assignment takes its expert's quantised weights
  (`jnp.take`), so a batch-1 decode step reads k experts, not E.
`implementation(name)` overrides the automatic choice at trace time.

Exactness: every step is row-local (activation FP8 simulation, SwiGLU, roundings) except the
matmuls, and each token's k outputs are summed in ascending expert order from 0.0, the order
of `expert_sum` (whose unrouted experts add exact zeros). XLA:CPU's matmul gives the same bits
for a row whatever the other rows, except that a single-row matmul takes a matrix-vector
kernel with another summation order; the gather path therefore multiplies 2-row blocks (the
row and a zero row), and the paths are bitwise equal to each other and batch invariant on CPU
(equal to `expert_sum` bitwise for T >= 2, to float32 rounding for T = 1).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from v4jax.model.layers import F32, act_einsum, dequant, mm_act
from v4jax.numerics import Precision, fp8_quant_dequant

IMPLEMENTATIONS = ("auto", "dense", "tiles", "ragged", "gather")
# "auto" gathers weights per assignment when rows * GATHER_RATIO <= E: with A = T * k rows
# drawn from E experts, about E (1 - exp(-A / E)) distinct experts are used, so at A = E / 2
# the gather reads 1.27x the distinct experts' weights (and skips the sort and the tile loop),
# while from A ~ E on it re-reads duplicates (1.6x at A = E) and the grouped paths win.
GATHER_RATIO = 2
# a jit-cache-sensitive context: a function traced under another value is traced again
_IMPL = jax.make_user_context("auto")


@contextlib.contextmanager
def implementation(name: str):
    """Selects the routed-expert path for code traced inside the block ("auto", "dense",
    "tiles", "ragged" or "gather"); "auto" picks by row count and `jax.default_backend()`.
    The choice is part of jit's cache key, so a jitted function called under another value is
    traced again."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={name!r}: expected one of {IMPLEMENTATIONS}")
    with _IMPL(name):
        yield


def choose(rows: int, n: int) -> str:
    """The path for `rows` assignments over `n` experts under the current `implementation`."""
    impl = _IMPL.value
    if impl != "auto":
        return impl
    if rows * GATHER_RATIO <= n:
        return "gather"
    return "tiles" if jax.default_backend() == "cpu" else "ragged"


def swiglu(g: jnp.ndarray, u: jnp.ndarray, limit: float) -> jnp.ndarray:
    """silu(min(g, L)) * clamp(u, -L, L) in float32 (reference `Expert`)."""
    if limit > 0:
        u = jnp.clip(u, -limit, limit)
        g = jnp.minimum(g, limit)
    return jax.nn.silu(g) * u


def _ffn(xq, cw, linear, prec: Precision, limit: float) -> jnp.ndarray:
    """One expert on rows xq [..., D] (already FP8-simulated) with routing weights cw [...];
    `linear(a, i)` applies w1 (i=0), w2 (1) or w3 (2) and rounds to the activation dtype."""
    g = linear(xq, 0)
    u = linear(xq, 2)
    h = prec.round(cw[..., None] * swiglu(g, u, limit))  # weight before w2 (reference `Expert`)
    h = fp8_quant_dequant(h, 128) if prec.simulate_quant else h
    return linear(h, 1)


def _act_in(x, prec: Precision) -> jnp.ndarray:
    xq = x.astype(F32)
    return fp8_quant_dequant(xq, 128) if prec.simulate_quant else xq


def expert_sum(x, combine, ws, fmt: str, prec: Precision, limit: float) -> jnp.ndarray:
    """x [T, D], combine [E', T], expert weights ws [E', ...] -> sum over the E' experts, in
    index order, of combine-weighted expert outputs [T, D] float32."""
    xq = _act_in(x, prec)

    def expert(acc, inputs):
        *w, cw = inputs

        def linear(a, i):
            return prec.round(mm_act(a, dequant(fmt, w[2 * i], w[2 * i + 1]), prec))

        return acc + _ffn(xq, cw, linear, prec, limit), None

    out, _ = jax.lax.scan(expert, jnp.zeros(x.shape, F32), (*ws, combine))
    return out


def combine_weights(w: jnp.ndarray, top: jnp.ndarray, n: int) -> jnp.ndarray:
    """Routing weights w [T, k] of experts top [T, k] -> [n, T] weight of expert e (0..n-1)
    for each token (0 where not routed; ids outside [0, n) match nothing)."""
    onehot = top[..., None] == jnp.arange(n)  # [T, k, n]
    return jnp.sum(jnp.where(onehot, w[..., None], 0.0), axis=1).T


# ---------------------------------------------------------------------------------------------
# Grouped entry points


def expert_rows(x, eid, cw, ws, fmt: str, prec: Precision, limit: float) -> jnp.ndarray:
    """x [R, D] activation rows, eid [R] int32 expert index into ws (-1: row unused, output 0),
    cw [R] float32 routing weights, ws = (w1, s1, w2, s2, w3, s3) with leading axis E' ->
    [R, D] float32: row r is expert eid[r]'s output on x[r] exactly as `expert_sum` adds it
    (fp8 activation simulation, cw applied before w2, prec.round points, fp8 simulation of h)."""
    r, n = eid.shape[0], ws[0].shape[0]
    if x.ndim != 2 or x.shape[0] != r or cw.shape != (r,):
        raise ValueError(f"expert_rows: x {x.shape}, eid {eid.shape}, cw {cw.shape} mismatch")
    impl = choose(r, n)
    if impl == "dense":
        combine = jnp.where(eid[None, :] == jnp.arange(n)[:, None], cw.astype(F32)[None], 0.0)
        return expert_sum(x, combine, ws, fmt, prec, limit)
    src = jnp.arange(r, dtype=jnp.int32)
    return _grouped(impl, _act_in(x, prec), src, eid, cw.astype(F32), ws, fmt, prec, limit)


def routed_experts(x, w, top, ws, fmt: str, prec: Precision, limit: float) -> jnp.ndarray:
    """x [T, D], routing weights w [T, k] of experts top [T, k] (ids outside [0, E') are not
    routed), ws [E', ...] -> sum of the routed experts' outputs [T, D] float32 (= `expert_sum`
    with `combine_weights`)."""
    (t, k), n = top.shape, ws[0].shape[0]
    impl = choose(t * k, n)
    if impl == "dense":
        return expert_sum(x, combine_weights(w, top, n), ws, fmt, prec, limit)
    eid, cw = _assignments(w.astype(F32), top.astype(jnp.int32), n)  # [T, k]
    src = jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)
    rows = _grouped(impl, _act_in(x, prec), src, eid.ravel(), cw.ravel(), ws, fmt, prec, limit)
    rows = rows.reshape(t, k, -1)
    # ascending expert order from 0.0 (expert_sum's order); unused slots are exact zeros
    order = jnp.argsort(jnp.where(eid >= 0, eid, n), axis=1, stable=True)
    rows = jnp.take_along_axis(rows, order[..., None], axis=1)
    acc = jnp.zeros(rows.shape[::2], F32)
    for j in range(k):
        acc = acc + rows[:, j]
    return acc


def _assignments(w, top, n: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """w, top [T, k] -> expert ids [T, k] (-1: not routed, or a repeat of an earlier slot's
    expert) and weights [T, k]; a repeated expert runs once with its summed weight, as in
    `combine_weights` (same values summed in the same slot order)."""
    k = top.shape[1]
    valid = (top >= 0) & (top < n)
    top = jnp.where(valid, top, -1)
    same = top[:, :, None] == top[:, None, :]  # [T, k, k]
    earlier = jnp.arange(k)[None, :] < jnp.arange(k)[:, None]  # slot j before slot i
    repeat = jnp.any(same & earlier, axis=-1)
    cw = jnp.sum(jnp.where(same, w[:, None, :], 0.0), axis=-1)
    return jnp.where(valid & ~repeat, top, -1), cw


def _grouped(impl, xq, src, eid, cw, ws, fmt, prec, limit) -> jnp.ndarray:
    """Rows r = (xq[src[r]], eid[r], cw[r]) -> [R, D] float32 expert outputs (0 where eid < 0)."""
    if impl == "gather":
        return _gather_rows(jnp.take(xq, src, axis=0), eid, cw, ws, fmt, prec, limit)
    if impl == "tiles":
        return _tile_rows(xq, src, eid, cw, ws, fmt, prec, limit)
    if impl == "ragged":
        return _ragged_rows(xq, src, eid, cw, ws, fmt, prec, limit)
    raise ValueError(f"implementation={impl!r}: expected one of {IMPLEMENTATIONS}")


def _deq_stack(fmt: str, w, s) -> jnp.ndarray:
    """Dequantises stacked weights w [N, O, ...] (scales s [N, ...] or None) -> [N, O, I]."""
    return jax.vmap(lambda a, b: dequant(fmt, a, b))(w, s)


def _gather_rows(xr, eid, cw, ws, fmt, prec, limit) -> jnp.ndarray:
    """xr [R, D]: each row multiplies its own expert's weights, taken from the quantised
    tensors ([R, ...] gathers, then dequantised)."""
    idx = jnp.maximum(eid, 0)
    taken = [None if a is None else jnp.take(a, idx, axis=0) for a in ws]
    if jax.default_backend() == "cpu":  # XLA:CPU runs the gather fused into the dequant ~3x slower
        taken = jax.lax.optimization_barrier(taken)

    def linear(a, i):
        wi = _deq_stack(fmt, taken[2 * i], taken[2 * i + 1])  # [R, O, I]
        a2 = jnp.stack([a, jnp.zeros_like(a)], axis=1)  # [R, 2, I]: the GEMM kernel (module doc)
        return prec.round(act_einsum("rmi,roi->rmo", a2, wi, prec)[:, 0])

    out = _ffn(xr, cw, linear, prec, limit)
    return jnp.where(eid[:, None] >= 0, out, 0.0)


def tile_size(rows: int, n: int) -> int:
    """Rows per tile: the mean group size rounded up to a power of two, in [8, 128] (static)."""
    mean = max(1, -(-rows // n))
    return min(128, max(8, 1 << (mean - 1).bit_length()))


def _tile_layout(eid, n: int, tile: int, n_tiles: int):
    """Expert-sorted, tile-padded layout of R rows: slot [R] of each row in the padded buffer
    (out of range if unused), row_of [n_tiles * tile] (R: empty slot), expert of each tile
    [n_tiles] (n: unused tile)."""
    r = eid.shape[0]
    key = jnp.where(eid >= 0, eid, n)
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=n + 1)[:n].astype(jnp.int32)
    tiles = (sizes + tile - 1) // tile
    tile_end = jnp.cumsum(tiles)  # [n]
    row_start = jnp.cumsum(sizes) - sizes
    skey = key[order]
    e = jnp.minimum(skey, n - 1)
    slot = (tile_end - tiles)[e] * tile + jnp.arange(r, dtype=jnp.int32) - row_start[e]
    slot = jnp.where(skey < n, slot, n_tiles * tile)  # [R] in sorted order
    row_of = jnp.full(n_tiles * tile, r, jnp.int32).at[slot].set(order, mode="drop")
    slot = jnp.zeros(r, jnp.int32).at[order].set(slot, unique_indices=True)
    tile_e = jnp.searchsorted(tile_end, jnp.arange(n_tiles), side="right").astype(jnp.int32)
    return slot, row_of, tile_e


def _tile_rows(xq, src, eid, cw, ws, fmt, prec, limit) -> jnp.ndarray:
    """Grouped path for the CPU: a scan over a static bound of row tiles, each of one expert;
    sum_e ceil(n_e / tile) <= ceil(R / tile) + min(E', R) tiles hold all groups."""
    (r,), n, d = eid.shape, ws[0].shape[0], xq.shape[1]
    tile = tile_size(r, n)
    n_tiles = -(-r // tile) + min(n, r)
    slot, row_of, tile_e = _tile_layout(eid, n, tile, n_tiles)
    xidx = jnp.take(src, row_of, mode="fill", fill_value=xq.shape[0])
    xt = jnp.take(xq, xidx, axis=0, mode="fill", fill_value=0).reshape(n_tiles, tile, d)
    ct = jnp.take(cw, row_of, mode="fill", fill_value=0).reshape(n_tiles, tile)

    def run(xt, ct, w):
        def linear(a, i):
            return prec.round(mm_act(a, dequant(fmt, w[2 * i], w[2 * i + 1]), prec))

        return _ffn(xt, ct, linear, prec, limit)

    def skip(xt, ct, w):
        return jnp.zeros(xt.shape, F32)

    @jax.checkpoint  # backward recomputes a tile's dequantised weights instead of storing them
    def body(carry, inputs):
        xt, ct, e = inputs
        # slice the expert here: operands of the cond are copied, so it gets one expert, not E'
        w = [None if a is None else jax.lax.dynamic_index_in_dim(a, e, 0, False) for a in ws]
        return carry, jax.lax.cond(e < n, run, skip, xt, ct, w)

    _, out = jax.lax.scan(body, None, (xt, ct, tile_e))  # [n_tiles, tile, D]
    return jnp.take(out.reshape(-1, d), slot, axis=0, mode="fill", fill_value=0)


def _ragged_rows(xq, src, eid, cw, ws, fmt, prec, limit) -> jnp.ndarray:
    """Rows sorted by expert, one grouped matmul per linear over all E' experts' weights
    (dequantised to the activation dtype next to it), un-sorted."""
    n = ws[0].shape[0]
    key = jnp.where(eid >= 0, eid, n)
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=n + 1)[:n].astype(jnp.int32)  # unused rows sort last
    xs, cs = jnp.take(xq, src[order], axis=0), cw[order]

    def linear(a, i):
        wi = jnp.swapaxes(_deq_stack(fmt, ws[2 * i], ws[2 * i + 1]), 1, 2)  # [E', I, O]
        return prec.round(ragged_dot(a, wi, sizes, prec))

    out = _ffn(xs, cs, linear, prec, limit)
    out = jnp.zeros_like(out).at[order].set(out, unique_indices=True)
    return jnp.where(eid[:, None] >= 0, out, 0.0)


def ragged_dot(lhs, rhs, sizes, prec: Precision) -> jnp.ndarray:
    """lhs [M, I] rows grouped by `sizes` [G], rhs [G, I, O] -> [M, O] float32 with operands in
    the activation dtype (float32 at HIGHEST precision when that is float32)."""
    dt = prec.dtype
    hi = jax.lax.Precision.HIGHEST if dt == jnp.dtype(F32) else None
    lhs, rhs = lhs.astype(dt), rhs.astype(dt)
    try:
        import tokamax

        return tokamax.ragged_dot(lhs, rhs, sizes, precision=hi, preferred_element_type=F32)
    except (ImportError, NotImplementedError, ValueError, TypeError):
        return jax.lax.ragged_dot(lhs, rhs, sizes, precision=hi, preferred_element_type=F32)
