"""Expert parallelism with all-to-all dispatch (`jax.lax.ragged_all_to_all`).

When the active sharding rules split "experts" over mesh axes `ex` (`sharding/rules.py`), each
of the n expert ranks holds E / n whole experts, and tokens travel to the ranks that hold their
experts and back: a layer moves about T * k * D activations instead of all-gathering T * D onto
every rank. Inside one `shard_map`, each rank:

1. takes its share of the tokens: tokens replicated over some expert axes (`reduce`: DECODE's
   expert axis, TRAIN's tensor axis) are split among those ranks, so each token is sent once;
2. sorts its tokens' k assignments by expert (hence by destination rank), exchanges the counts
   (`all_to_all`) and sends rows, local expert ids and routing weights with `ragged_all_to_all`
   into a worst-case receive buffer (dropless: n T min(k, E / n) rows hold every sender's
   rows to this rank);
3. computes the received rows with `expert_rows` on its local experts and sends the results back
   (a second ragged all-to-all with the offsets mirrored);
4. sums each token's k outputs from zero in ascending expert order, the order of the dense
   `expert_sum` scan, so results equal the unsharded MoE (batch invariance); tokens split in
   step 1 are all-gathered back.

XLA:CPU has no ragged-all-to-all; there the same exchange is emulated by a dense `all_to_all`
of a [n, capacity, ...] buffer (capacity: the worst case of one source-destination pair), so CPU
tests run the same index arithmetic. `impl` ("auto", "ragged", "dense", "gather"), or the
`dispatch(...)` context, picks the exchange; "auto" chooses per platform at lowering time.

"gather" is the earlier dispatch (every token all-gathered to every rank, a dense scan of the
local experts, reduce-scatter), kept as a reference for tests and traffic comparisons.

`buffer(factor)` bounds the receive buffer at `factor` times a balanced load (T k rows, the
rows each rank sends) instead of the dropless worst case n T min(k, E / n) (8x a balanced
load on 8 ranks at k = 6): every buffer of the exchange and the expert computation on it
shrinks by that ratio. A receiver keeps the sources' rows in rank order (each source's slice
in expert order) up to the bound; the rest are dropped (their outputs are 0) and counted:
`expert_parallel(..., with_dropped=True)`, the train step's `moe_dropped` metric. The default
(None) is dropless.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding import constraints
from v4jax.model.experts import combine_weights, expert_rows, expert_sum

__all__ = ["IMPLS", "buffer", "dispatch", "expert_parallel", "ragged_all_to_all_dense"]

IMPLS = ("auto", "ragged", "dense", "gather")
F32 = jnp.float32
_IMPL = jax.make_user_context(default_value="auto")  # read at trace time: part of cache keys
_BUFFER = jax.make_user_context(default_value=None)


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"expert-parallel impl={impl!r}: expected one of {IMPLS}")
    return impl


@contextlib.contextmanager
def dispatch(impl: str) -> Iterator[None]:
    """Selects the expert-parallel exchange for model code traced inside (default "auto")."""
    with _IMPL(_check_impl(impl)):
        yield


def check_buffer(factor: float | None) -> float | None:
    """`factor` if it is None (dropless) or a number >= 1 (a balanced load must fit)."""
    if factor is not None and not (isinstance(factor, int | float) and factor >= 1):
        raise ValueError(f"expert-parallel buffer factor {factor!r}: expected None or >= 1")
    return None if factor is None else float(factor)


@contextlib.contextmanager
def buffer(factor: float | None) -> Iterator[None]:
    """Bounds the expert-parallel receive buffer at `factor` x a balanced load for model code
    traced inside (None: dropless, the default); see the module docstring."""
    with _BUFFER(check_buffer(factor)):
        yield


# ------------------------------------------------------------------------------ exchange


def ragged_all_to_all_dense(
    operand,
    output,
    input_offsets,
    send_sizes,
    output_offsets,
    recv_sizes,
    *,
    axis_name,
    recv_offsets=None,
    capacity=None,
):
    """`jax.lax.ragged_all_to_all` semantics from a dense `all_to_all` (for XLA:CPU).

    Slice i of `operand` (rows input_offsets[i] + [0, send_sizes[i])) goes to rank i, padded to
    `capacity` rows (default min(rows of operand, rows of output): no slice is larger); the
    receiver
    writes the recv_sizes[s] rows from rank s at the offset s chose for it (`output_offsets`,
    offsets on the receiver), leaving the rest of `output` as given. `recv_offsets` [n], where
    each source's rows land here (= all_to_all(output_offsets)), saves that exchange when the
    caller has it."""
    n = input_offsets.shape[0]
    cap = min(operand.shape[0], output.shape[0]) if capacity is None else capacity
    i = jnp.arange(cap, dtype=input_offsets.dtype)
    rows = jnp.minimum(input_offsets[:, None] + i, operand.shape[0] - 1)  # [n, cap]
    got = jax.lax.all_to_all(operand[rows], axis_name, 0, 0, tiled=True)  # [n, cap, ...]
    if recv_offsets is None:
        recv_offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    dst = jnp.where(i < recv_sizes[:, None], recv_offsets[:, None] + i, output.shape[0])
    return output.at[dst.reshape(-1)].set(got.reshape(n * cap, *operand.shape[1:]), mode="drop")


def _exchange(impl: str, ex: tuple[str, ...], capacity: int):
    """The ragged exchange of `impl`: ragged (GPU / TPU), dense (any), or by platform. Called
    as f(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, recv_offsets)
    with the receiver-side offsets of each source's rows, which the caller knows (this spares
    the dense emulation an all-to-all); no slice exceeds `capacity` rows."""

    def ragged(*args):
        return jax.lax.ragged_all_to_all(*args[:6], axis_name=ex)

    def dense(*args):
        return ragged_all_to_all_dense(
            *args[:6], axis_name=ex, recv_offsets=args[6], capacity=capacity
        )

    if impl == "ragged":
        return ragged
    if impl == "dense":
        return dense
    return lambda *a: jax.lax.platform_dependent(*a, cpu=dense, default=ragged)


def _exclusive_cumsum(v: jnp.ndarray) -> jnp.ndarray:
    """[n] -> [n] sums of the earlier entries (n = ranks: a masked [n, n] sum is a few ops to
    compile, where `jnp.cumsum` off TPU becomes a parallel-prefix network)."""
    n = v.shape[0]
    before = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]
    return jnp.sum(jnp.where(before, v[None, :], 0), axis=1).astype(v.dtype)


# ------------------------------------------------------------------------ all-to-all path


def _share(a: jnp.ndarray, reduce: tuple[str, ...], fill) -> jnp.ndarray:
    """This rank's contiguous share [ceil(T' / m), ...] of rows replicated over `reduce`."""
    m, t = jax.lax.axis_size(reduce), a.shape[0]
    c = -(-t // m)
    a = jnp.pad(a, ((0, m * c - t),) + ((0, 0),) * (a.ndim - 1), constant_values=fill)
    return jax.lax.dynamic_slice_in_dim(a, jax.lax.axis_index(reduce) * c, c)


def _assignments(w: jnp.ndarray, top: jnp.ndarray, e: int):
    """w / top [T, k] -> expert [T, k] (e where unused: a repeat of an earlier slot's expert or
    an id outside [0, e)) and weight [T, k]: the summed weight of the slot's expert, as
    `combine_weights` sums repeats (hash routing may repeat an expert)."""
    same = top[:, :, None] == top[:, None, :]  # [T, k, k']
    cw = jnp.sum(jnp.where(same, w[:, None, :], 0.0), axis=2)
    k = top.shape[1]
    repeat = jnp.any(same & (jnp.arange(k)[None, :] < jnp.arange(k)[:, None]), axis=2)
    ok = (top >= 0) & (top < e) & ~repeat
    return jnp.where(ok, top, e), cw.astype(F32)


def _combine(y: jnp.ndarray, order: jnp.ndarray, eid: jnp.ndarray) -> jnp.ndarray:
    """Results y [T k, D] in `order` (expert-sorted assignments), experts eid [T, k] -> [T, D]:
    each token's outputs summed from zero in ascending expert order, the order of the dense
    `expert_sum` scan (unused slots hold exact zeros)."""
    (t, k), d = eid.shape, y.shape[1]
    y = jnp.zeros_like(y).at[order].set(y, unique_indices=True).reshape(t, k, d)
    slots = jnp.argsort(eid, axis=1, stable=True)  # ascending expert per token
    y = jnp.take_along_axis(y, slots[:, :, None], axis=1)
    out = jnp.zeros((t, d), F32)
    for j in range(k):
        out = out + y[:, j]
    return out


def _route(x, w, top, ws, *, ex, e, impl, fmt, prec, limit, factor):
    """One rank's tokens x [T, D], w / top [T, k] through the experts of all ranks -> ([T, D]
    float32, assignments dropped here []) (steps 2-4 of the module docstring)."""
    t, k = top.shape
    n_local = ws[0].shape[0]
    n = e // n_local
    eid, cw = (a.reshape(-1) for a in _assignments(w, top, e))  # [T k]
    order = jnp.argsort(eid, stable=True)  # by expert, so by destination rank; unused last
    eid_s = eid[order]
    dest = eid_s // n_local  # unused: n
    send = jnp.sum(dest[None, :] == jnp.arange(n)[:, None], axis=1, dtype=jnp.int32)
    in_off = _exclusive_cumsum(send)  # this rank's slice for each destination
    # Dropless bounds: a token's experts are distinct (repeats merged), so it sends at most
    # min(k, E / n) rows to one rank; the receive buffer holds that from all n sources, or
    # `factor` x the T k rows of a balanced load, keeping each source's first rows that fit.
    pair = t * min(k, n_local)
    cap = n * pair if factor is None else min(n * pair, -(-int(factor * t * k) // 8) * 8)
    recv = jax.lax.all_to_all(send, ex, 0, 0, tiled=True)  # rows from each source
    recv_off = _exclusive_cumsum(recv)  # where each source's rows land here
    recv = jnp.clip(cap - recv_off, 0, recv)  # those that fit (all, when dropless)
    # where ours land on each destination, how many fit there; where results land back here
    offs = jax.lax.all_to_all(jnp.stack([recv_off, recv, in_off], 1), ex, 0, 0, tiled=True)
    out_off, kept, back_off = offs[:, 0], offs[:, 1], offs[:, 2]
    # Dispatch: rows, then (weight, local expert) pairs; float32 keeps the weight differentiable
    # and holds expert ids exactly (< 2^24). Unwritten rows keep expert -1: output 0.
    exchange = _exchange(impl, ex, min(pair, cap))
    there = (in_off, kept, out_off, recv, recv_off)
    rows = exchange(x[order // k], jnp.zeros((cap, x.shape[1]), x.dtype), *there)
    meta = jnp.stack([cw[order], (eid_s - dest * n_local).astype(F32)], axis=1)
    meta = exchange(meta, jnp.broadcast_to(jnp.array([0.0, -1.0], F32), (cap, 2)), *there)
    y = expert_rows(rows, meta[:, 1].astype(jnp.int32), meta[:, 0], ws, fmt, prec, limit)
    # Combine: results return to the slices they came from; unsent (dropped) rows stay 0.
    y = exchange(y, jnp.zeros((t * k, y.shape[1]), F32), recv_off, recv, back_off, kept, in_off)
    return _combine(y, order, eid.reshape(t, k)), jnp.sum(send - kept).astype(F32)


def _a2a_body(x, w, top, *ws, ex, reduce, e, impl, fmt, prec, limit, factor, every):
    """One rank: its tokens x [T', D], w / top [T', k], its experts ws [E / n, ...] ->
    ([T', D] float32, assignments dropped on all ranks [])."""
    t = x.shape[0]
    if reduce:  # tokens replicated over `reduce`: each of those ranks sends its share
        x, w, top = _share(x, reduce, 0), _share(w, reduce, 0), _share(top, reduce, -1)
    common = dict(ex=ex, e=e, impl=impl, fmt=fmt, prec=prec, limit=limit, factor=factor)
    out, dropped = _route(x, w, top, ws, **common)
    if reduce:
        out = jax.lax.all_gather(out, reduce, axis=0, tiled=True)[:t]
    return out, jax.lax.psum(dropped, every)


# -------------------------------------------------------------------------- gather path


def _gather_body(x, w, top, *ws, ex, reduce, gather, fmt, prec, limit):
    """The all-gather dispatch: every token of the expert group on every rank, a dense scan
    of the local experts, reduce-scatter (and psum over `reduce`) to combine."""
    if gather:
        x, w, top = (jax.lax.all_gather(a, gather, axis=0, tiled=True) for a in (x, w, top))
    n_local = ws[0].shape[0]
    first = jax.lax.axis_index(ex) * n_local
    out = expert_sum(x, combine_weights(w, top - first, n_local), ws, fmt, prec, limit)
    if gather:
        out = jax.lax.psum_scatter(out, gather, scatter_dimension=0, tiled=True)
    if reduce:
        out = jax.lax.psum(out, reduce)
    return out, jnp.zeros((), F32)  # [T', D] float32; dropless


def expert_parallel(
    experts,
    x,
    w,
    top,
    ex: tuple[str, ...],
    *,
    impl: str | None = None,
    tok=None,
    with_dropped: bool = False,
):
    """Routed experts split over mesh axes `ex` (from the active sharding rules): x [T, D],
    w / top [T, k] -> [T, D] float32 (and, `with_dropped`, the assignments the `buffer` bound
    dropped on all ranks, float32 []). Tokens keep their sharding: over mesh axes `tok`
    (default: the rules' "batch" axes for T). `impl` (default: the `dispatch` context, "auto")
    selects the exchange (module docstring)."""
    impl = _check_impl(_IMPL.value if impl is None else impl)
    ws = experts.weights()
    e = ws[0].shape[0]
    if x.ndim != 2 or w.shape != top.shape or top.shape[0] != x.shape[0]:
        raise ValueError(f"expert_parallel: x {x.shape}, w {w.shape}, top {top.shape}")
    tok = constraints.mesh_axes("batch", x.shape[0]) if tok is None else tuple(tok)
    gather = tuple(a for a in tok if a in ex)
    reduce = tuple(a for a in ex if a not in gather)
    common = dict(ex=ex, reduce=reduce, fmt=experts.fmt, prec=experts.prec, limit=experts.limit)
    if impl == "gather":
        body = functools.partial(_gather_body, gather=gather, **common)
    else:
        every = tuple(dict.fromkeys(ex + tok))
        body = functools.partial(
            _a2a_body, e=e, impl=impl, factor=_BUFFER.value, every=every, **common
        )
    t_spec = P(tok or None, None)
    w_specs = tuple(P(ex, *(None,) * (a.ndim - 1)) for a in ws)
    run = constraints.shard_map(
        body, in_specs=(t_spec, t_spec, t_spec, *w_specs), out_specs=(t_spec, P())
    )
    out, dropped = run(x, w, top, *ws)
    return (out, dropped) if with_dropped else out
