"""Activation sharding through logical names: the only sharding hook model code calls.

Model code passes logical names (`constrain(x, ("batch", "length", None, "embed"))`) and asks
which mesh axes a logical name maps to (`mesh_axes("experts", E)`, for the MoE's collectives);
it never sees a mesh. Outside a `use_rules` context (single device, no mesh) `constrain` is the
identity and `mesh_axes` returns (), so the unsharded model is unchanged. `use_rules` is entered
by whoever jit-traces the model on a mesh (`v4jax.api`, the decode loop, `scripts/plan.py`).
It acts at trace time, so the active (mesh, rules) is a `jax.make_user_context` value: part of
every JAX tracing / compilation cache key, so a sub-trace cached without rules (e.g. a scan
body traced by an unsharded run) is never reused under rules, or under other rules.

This module imports only jax and the rest of `sharding/` (no v4jax), so the model layer can use
it without a cycle; it is the one place model code depends on this package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.mesh import auto
from sharding.rules import Rules, rules_for
from sharding.specs import param_spec, resolve, spec_axes, zero_fill

__all__ = [
    "active",
    "axis_size",
    "constrain",
    "gathered",
    "gathered_param",
    "mesh_axes",
    "per_matrix",
    "shard_map",
    "stored_spec",
    "stored_specs",
    "use_rules",
]


@dataclasses.dataclass(frozen=True)
class _Context:
    mesh: Mesh
    rules: Rules


_ACTIVE = jax.make_user_context(default_value=None)  # a _Context or None; in jit cache keys


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules | str) -> Iterator[None]:
    """Activates the activation rules of `rules` on `mesh` for model code traced inside."""
    with _ACTIVE(_Context(auto(mesh), rules_for(rules))):
        yield


_STORED = jax.make_user_context(default_value=None)  # tuple of (path, PartitionSpec) or None


@contextlib.contextmanager
def stored_specs(specs: dict[tuple[str, ...], PartitionSpec] | None) -> Iterator[None]:
    """Declares where each parameter is stored (path of names -> PartitionSpec) for code traced
    inside that only sees arrays, such as the optimizer (`per_matrix(stored=...)`)."""
    value = None if specs is None else tuple(sorted(specs.items()))
    with _STORED(value):
        yield


def stored_spec(path: tuple[str, ...]) -> PartitionSpec | None:
    """The PartitionSpec `stored_specs` declared for the parameter at `path`, else None."""
    table = _stored_table(_STORED.value)
    return None if table is None else table.get(tuple(path))


@functools.lru_cache(maxsize=8)
def _stored_table(value):
    return None if value is None else dict(value)


def active() -> bool:
    return _ACTIVE.value is not None


def _spec(ctx: _Context, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> PartitionSpec:
    try:
        return resolve(tuple(axes), tuple(shape), dict(ctx.mesh.shape), ctx.rules.activations)
    except KeyError as e:
        raise ValueError(
            f"activation axis {e.args[0]!r} has no rule in the {ctx.rules.name} activation "
            "table of sharding/rules.py"
        ) from None


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """`x` constrained to the sharding its dims' logical names give; identity without rules."""
    ctx = _ACTIVE.value
    if ctx is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, _spec(ctx, axes, x.shape)))


def gathered(module, cast: bool = False, whole: tuple[str, ...] = (), upcast: bool = False):
    """`module` (an nnx module: one layer of a scanned stack, or the MTP block) with each
    parameter constrained to its rules-table sharding without the ZeRO axes for use, and its
    gradient constrained back to the parameter's own (ZeRO) sharding: the FSDP / ZeRO-3
    all-gather before use and reduce-scatter after, per layer, made explicit. Identity without
    rules (and under rules without ZeRO axes, where the two shardings agree).

    `cast`: a parameter whose metadata names a narrower `use_dtype` (a float32 master that
    every consumer casts to that dtype first, such as bf16 matmul operands) is cast before the
    all-gather, half the bytes moved and held, and its gradient cast back to float32 before
    the reduce-scatter: the same values as casting after the gather. `upcast`: the gathered
    copy is converted back to float32 (the same values), for parameters used in pieces (the
    routed experts' tiles and rows) whose gradient then still sums in float32; only the bytes
    moved halve. `whole`: logical axes whose dims are gathered whole even where the rules
    table splits them (`gathered_param`).

    Left implicit, XLA's SPMD partitioner (jax 0.12, CPU; Shardy and GSPMD) returned wrong
    values: a scan whose body multiplies a carry batch-split over (data, expert) by a slice of
    a stacked weight split over (expert, tensor) came out 0.32 off (its gradient 0.62), while
    the same weight gathered in the body is right (tests/test_train_zero.py; README)."""
    from flax import nnx  # only here: the rest of this module is plain jax

    if _ACTIVE.value is None:
        return module
    graph, state = nnx.split(module)
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
    leaves = []
    for path, var in nnx.to_flat_state(state):
        x, spec = var.get_value(), tuple(specs[path].get_value())
        if len(spec) >= x.ndim:  # annotated with logical names (else left as it is)
            dtype = var.get_metadata().get("use_dtype") if cast else None
            x = gathered_param(x, spec[len(spec) - x.ndim :], whole, dtype, upcast)
        leaves.append((path, var.replace(x)))
    return nnx.merge(graph, nnx.from_flat_state(leaves))


def gathered_param(
    x: jax.Array,
    axes: tuple[str | None, ...],
    whole: tuple[str, ...] = (),
    dtype=None,
    upcast: bool = False,
) -> jax.Array:
    """One parameter `x` with logical axes `axes` (no "layers"), as `gathered` treats each of
    a module's: in its use sharding (the dims named in `whole` not split at all), its gradient
    in its stored (ZeRO) sharding; `dtype`: cast to it for the gather (`gathered`'s `cast`;
    only where narrower than x's and the use sharding gathers), and back after it with
    `upcast`. Identity without rules."""
    ctx = _ACTIVE.value
    if ctx is None:
        return x
    mesh_shape = dict(ctx.mesh.shape)
    _, stored = param_spec(axes, x.shape, mesh_shape, ctx.rules)
    use_axes = tuple(None if a in whole else a for a in axes)
    use, _ = param_spec(use_axes, x.shape, mesh_shape, ctx.rules)
    if use == stored or x.dtype not in _GRAD_DTYPES:
        return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, use))
    if dtype is not None and (x.dtype != jnp.float32 or jnp.dtype(dtype).itemsize >= 4):
        dtype = None  # only float32 masters are cast (the backward casts back to float32)
    # `whole`: the gradient is formed in the use layout first (a lookup's scatter-add of
    # batch-split rows), else XLA reshards the rows to the table's split (replicating them)
    use, stored = NamedSharding(ctx.mesh, use), NamedSharding(ctx.mesh, stored)
    dtype = None if dtype is None else jnp.dtype(dtype)
    return _fsdp(x, use, stored, bool(whole), dtype, upcast and dtype is not None)


_GRAD_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _fsdp(x, use: NamedSharding, stored: NamedSharding, via_use=False, dtype=None, upcast=False):
    """x (cast to `dtype` if given, and back to x's after the gather with `upcast`) in its use
    sharding (forward); its gradient (float32 again after a cast) in `stored` (backward;
    `via_use`: in `use` first)."""
    y = x
    if dtype is not None:  # cast where x is stored (else XLA may gather first, then cast)
        y = jax.lax.with_sharding_constraint(x.astype(dtype), stored)
    y = jax.lax.with_sharding_constraint(y, use)
    return y.astype(x.dtype) if upcast else y


def _fsdp_fwd(x, use, stored, via_use, dtype, upcast):
    return _fsdp(x, use, stored, via_use, dtype, upcast), None


def _fsdp_bwd(use, stored, via_use, dtype, upcast, _, g):
    if dtype is not None:  # cast for use: x was float32 (the only wider gradient dtype)
        g = g.astype(jnp.float32)
    if via_use:
        g = jax.lax.with_sharding_constraint(g, use)
    return (jax.lax.with_sharding_constraint(g, stored),)


_fsdp.defvjp(_fsdp_fwd, _fsdp_bwd)


def mesh_axes(name: str, size: int) -> tuple[str, ...]:
    """The mesh axes that split a dim of `size` named `name` (activation rules); () without
    rules or when no axis applies. For collectives inside `shard_map` bodies."""
    ctx = _ACTIVE.value
    if ctx is None:
        return ()
    entry = _spec(ctx, (name,), (size,))[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def axis_size(axes: tuple[str, ...]) -> int:
    """How many devices the mesh axes `axes` (from `mesh_axes`) span; 1 without rules."""
    ctx = _ACTIVE.value
    if ctx is None:
        return 1
    size = 1
    for a in axes:
        size *= ctx.mesh.shape[a]
    return size


def shard_map(f: Callable, *, in_specs, out_specs, check_vma: bool = False) -> Callable:
    """`jax.shard_map` on the active mesh; specs name axes obtained from `mesh_axes`.

    `check_vma` is off by default: bodies scan with carries that start unvarying (zeros) and
    become device-varying, which the checker rejects; bodies reduce explicitly instead."""
    ctx = _ACTIVE.value
    if ctx is None:
        raise RuntimeError("sharding.constraints.shard_map needs an active use_rules context")
    return jax.shard_map(
        f, mesh=ctx.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma
    )


def per_matrix(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    layout: str = "owner",
    stored: PartitionSpec | None = None,
) -> jax.Array:
    """`fn` (a computation on each trailing [O, I] matrix of a stack on its own, such as Muon's
    Newton-Schulz, finite on a zero matrix) applied to `x` [..., O, I] where each device holds
    whole matrices; the result in `x`'s layout.

    "owner" (hybrid ZeRO, V4 report §3.5.1) with `stored` (the leaf's own PartitionSpec): in a
    `shard_map`, each device flattens its block's stack dims and, for each mesh axis on a
    matrix dim, pads the stack with zero matrices to a multiple of the axis size and
    all-to-alls it there (a stack chunk out, the matrix dim's pieces in), so it ends with
    whole matrices, about 1/n of the leaf's, and runs `fn` on them alone; the same exchanges
    in reverse bring the result back and drop the padding: about the device's own share moves
    per axis, there and back, even for a stack no axis divides (V4-Pro's 24 experts per rank
    on `fsdp=16`). Where a device holds too few matrices for that to pay (`_spread`: one
    matrix, say), the axis's group gathers them instead and each member runs them all, as the
    report computes small dense leaves redundantly. Without `stored`, the stack dims are split
    over the rules' `zero` axes by constraints. "replicated": every device gets every matrix
    (the naive gather-all). "sharded": no constraint (GSPMD runs each matmul of `fn` on the
    ZeRO shards, with collectives). `fn(x)` without rules, or under rules without `zero`
    axes."""
    if layout not in ("owner", "replicated", "sharded"):
        raise ValueError(f"layout={layout!r}: expected 'owner', 'replicated' or 'sharded'")
    ctx = _ACTIVE.value
    if x.ndim < 2:
        raise ValueError(f"per_matrix: needs a stack of matrices [..., O, I], got {x.shape}")
    if ctx is None or not ctx.rules.zero or layout == "sharded":
        return fn(x)
    mesh_shape = dict(ctx.mesh.shape)
    if layout == "owner" and stored is not None and len(stored) <= x.ndim:
        parts = spec_axes(stored, x.ndim)
        body = functools.partial(_owner_local, fn, parts[-2:], mesh_shape)
        return jax.shard_map(
            body, mesh=ctx.mesh, in_specs=stored, out_specs=stored, check_vma=False
        )(x)
    if layout == "replicated":
        spec = PartitionSpec()
    else:
        spec = PartitionSpec(*[None] * x.ndim)
        mats = frozenset((x.ndim - 2, x.ndim - 1))
        spec = zero_fill(spec, x.shape, mesh_shape, ctx.rules.zero, mats)
    whole = lambda y: jax.lax.with_sharding_constraint(y, NamedSharding(ctx.mesh, spec))
    # the result constrained to the same spec keeps `fn` between two constraints, else XLA
    # propagates the leaf's own layout back into its matmuls (measured: GSPMD all-reduces)
    return whole(fn(whole(x)))


def _owner_local(fn, matrix_axes, mesh_shape, x):
    """`per_matrix`'s "owner" body on one device's block x [..., o, i]; `matrix_axes`: the mesh
    axes splitting O and I (major to minor)."""
    stack, (o, i) = x.shape[:-2], x.shape[-2:]
    x = x.reshape(-1, o, i)
    moves = []
    for dim, axes in zip((1, 2), matrix_axes, strict=True):
        for a in reversed(axes):  # minor-most first: the pieces concatenate in block order
            n, k = x.shape[0], mesh_shape[a]
            if k == 1:
                continue
            if _spread(n, k):
                x = jnp.pad(x, ((0, -n % k), (0, 0), (0, 0)))
                x = jax.lax.all_to_all(x, a, split_axis=0, concat_axis=dim, tiled=True)
            else:  # too few matrices to spread: the group gathers them, each runs them all
                x = jax.lax.all_gather(x, a, axis=dim, tiled=True)
            moves.append((a, dim, n))
    x = fn(x)
    for a, dim, n in reversed(moves):
        k = mesh_shape[a]
        if _spread(n, k):
            x = jax.lax.all_to_all(x, a, split_axis=dim, concat_axis=0, tiled=True)[:n]
        else:  # its own piece of the gathered result
            size = x.shape[dim] // k
            x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(a) * size, size, axis=dim)
    return x.reshape(*stack, o, i)


def _spread(n: int, k: int) -> bool:
    """Whether `per_matrix`'s owner layout spreads a device's `n` matrices over a mesh axis of
    `k` devices (padded to a multiple of k and all-to-all'd, there and back: each device
    sends 2 ceil(n / k) (k - 1) matrix pieces) rather than gathering them in the group (each
    receives (k - 1) n pieces and runs all n): whichever sends fewer bytes; spreading on a tie
    (less work and memory). A single matrix is gathered."""
    return 2 * -(-n // k) <= n
