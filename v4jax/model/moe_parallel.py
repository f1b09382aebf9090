"""Expert parallelism (when the active sharding rules split "experts" over mesh axes; see
`sharding/rules.py`): inside a `shard_map`, each expert rank holds E / n whole experts. Tokens
split over the expert axis are all-gathered (gather-based dispatch), each rank runs the same
scan over its own experts only, and the partial sums are reduce-scattered back (combine); tokens
already replicated over the expert axis are combined with a psum. The router (hash-routed or
scored) runs before the dispatch on the tokens' own shards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding import constraints
from v4jax.model.experts import combine_weights, expert_sum


def _expert_parallel_body(x, w, top, *ws, ex, gather, reduce, fmt, prec, limit):
    """One rank: its tokens x [T', D], w / top [T', k], its experts ws [E / n, ...]."""
    if gather:  # tokens split over (part of) the expert axes: dispatch = all-gather
        x, w, top = (jax.lax.all_gather(a, gather, axis=0, tiled=True) for a in (x, w, top))
    n_local = ws[0].shape[0]
    first = jax.lax.axis_index(ex) * n_local
    out = expert_sum(x, combine_weights(w, top - first, n_local), ws, fmt, prec, limit)
    if gather:  # combine: sum over expert ranks, each rank keeping its own tokens
        out = jax.lax.psum_scatter(out, gather, scatter_dimension=0, tiled=True)
    if reduce:
        out = jax.lax.psum(out, reduce)
    return out  # [T', D] float32


def expert_parallel(experts, x, w, top, ex: tuple[str, ...]) -> jnp.ndarray:
    """Routed experts split over mesh axes `ex` (from the active sharding rules): x [T, D],
    w / top [T, k] -> [T, D] float32. Tokens keep the "batch" sharding of the rules."""
    tok = constraints.mesh_axes("batch", x.shape[0])
    gather = tuple(a for a in tok if a in ex)
    reduce = tuple(a for a in ex if a not in gather)
    body = functools.partial(
        _expert_parallel_body,
        ex=ex,
        gather=gather,
        reduce=reduce,
        fmt=experts.fmt,
        prec=experts.prec,
        limit=experts.limit,
    )
    ws = experts.weights()
    t_spec = P(tok or None, None)
    w_specs = tuple(P(ex, *(None,) * (a.ndim - 1)) for a in ws)
    run = constraints.shard_map(body, in_specs=(t_spec, t_spec, t_spec, *w_specs), out_specs=t_spec)
    return run(x, w, top, *ws)
