"""Cost of a traced program per model component: matmul FLOPs, other operations and the
parameter bytes it reads.

Why: XLA's `cost_analysis` counts a scan / while body once, not times its trip count, and
V4 scans over layers with loops over experts inside. This walks the closed jaxpr of
`jax.make_jaxpr(fn)(*args)`; with `jax.ShapeDtypeStruct` arguments nothing is allocated.

* FLOPs: `dot_general` 2 x output size x contracted size; `ragged_dot_general` 2 x M x K x N
  (each lhs row meets one group; with the ragged dimension contracted, each group contracts its
  own rows). Other ops count apart as `elementwise`: one per output element (per input element
  for reductions, sorts, top-k), an order of magnitude only.
* Bodies: `jit` / closed_call / custom_jvp / custom_vjp / custom_vmap / remat are walked in
  place; `scan` counts `length` times; `while` its trip count when static (fori pattern: `i < n`
  with known start and bound, `i + step` in the body), else once (note); `cond` its most
  expensive branch (note); `shard_map` per-device shapes times the devices of its manual axes;
  `pallas_call` its `cost_estimate` flops if any (note).
* Parameter bytes (the leaves of the arguments named by `params`): a value computed from
  parameters and constants only (converts, reshapes, broadcasts, elementwise dequantisation, a
  table lookup indexed by a parameter, slices, gathers) is a *view* holding a fraction of each
  leaf. Slicing ops (slice, dynamic_slice, gather, split, a scan's per-step xs, a shard_map's
  local block) scale it by output / operand size. The first other op (a matmul, a reduction,
  anything that also takes activations) reads the view: fraction x leaf bytes x the trip counts
  around it, once per (leaf, slicing origin, loop nest). A dense op reads a weight whole; a
  decode step that gathers k of E experts reads k / E of them; a gather taking rows several
  times reads them each time. Limit: a slice along a broadcast-added dimension under-counts.

Components (`v4_component`, replaceable by any `classify(eqn) -> str | None`): the innermost
`jax.named_scope` if any (einsum's own spec scopes excepted); else the v4jax frames of the
equation's traceback, innermost first, generic helpers (`layers.py`, `numerics/`, row helpers of
`decode/chunk.py`) deferring to their caller: `kernels/sparse_attention` -> "attention core";
`indexer.py` -> "indexer scores" (`Indexer.scores` and its two parts, not through a `Linear`)
or "indexer";
`compressor.py`, `chunk.py:compress_chunk` -> "indexer" if the source line calling the compressor
names the indexer's (`indexer.compressor`, `ix.compressor`, `index_compressor`), else
"compressor"; `attention.py`, `chunk.py:attention_chunk` -> "attention"; `moe.py` -> "router"
(`Router`), "shared expert" (`SharedExpert`), else "routed experts", with `experts.py` /
`moe_parallel.py` deferring to it; `mhc.py` -> "mhc" (hc_head too);
`transformer.py` -> "head" (`Head`), "embed" (`embed_tokens`); the rest of `transformer.py`,
`block.py`, `chunk.py` -> "norms/residual"; nothing -> `fallback` ("other"). Inside a call the
call site's component wins when it has one (jitted jnp helpers are traced once; their cached
bodies may carry an earlier call site's traceback).
"""

from __future__ import annotations

import dataclasses
import linecache
import math
import os
import re
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.extend import core as jcore

__all__ = ["Loop", "Record", "Report", "count", "count_jaxpr", "v4_component"]


@dataclasses.dataclass(frozen=True)
class Record:
    """One contribution, already multiplied by the trip counts around it."""

    component: str
    flops: float = 0.0  # matmul FLOPs
    elementwise: float = 0.0  # other operations (module docstring)
    weight_bytes: float = 0.0  # parameter bytes read
    leaf: str | None = None  # the parameter leaf read (weight_bytes records)
    loops: tuple[int, ...] = ()  # enclosing loops, outermost first (keys of Report.loops)


@dataclasses.dataclass(frozen=True)
class Loop:
    kind: str  # "scan" or "while"
    trips: int | None  # None: a while loop without a static trip count (counted once)
    component: str
    parent: int | None


@dataclasses.dataclass(frozen=True)
class Report:
    records: tuple[Record, ...]
    loops: dict[int, Loop]
    leaf_bytes: dict[str, int]  # full size of every parameter leaf
    notes: tuple[str, ...]

    def total(self, field: str) -> float:
        return sum(getattr(r, field) for r in self.records)

    flops = property(lambda self: self.total("flops"))
    elementwise = property(lambda self: self.total("elementwise"))
    weight_bytes = property(lambda self: self.total("weight_bytes"))

    def by(self, field: str = "flops", key: Callable[[Record], object] | None = None) -> dict:
        """Sum of `field` grouped by `key(record)` (default: the component)."""
        out: dict = {}
        for r in self.records:
            if v := getattr(r, field):
                k = key(r) if key else r.component
                out[k] = out.get(k, 0.0) + v
        return out


# ---------------------------------------------------------------------------------------------
# Components from tracebacks

_PKG = os.path.dirname(os.path.abspath(__file__))
_ROW_HELPERS = ("_take_rows", "_scatter_rows", "_window_idx")  # decode/chunk.py
_MOE = {"Router": "router", "SharedExpert": "shared expert"}
# how the model calls the indexer's own compressor (attention.py, decode/chunk.py)
_INDEXER_CALL = re.compile(r"(\bindexer|\bix)\.compressor\b|\bindex_compressor\b")


def _frames(eqn) -> list:
    """(file name, function, line, path) of the v4jax frames, innermost first."""
    tb, out = eqn.source_info.traceback, []
    for f in tb.frames if tb is not None else ():
        if f.file_name.startswith(_PKG + os.sep):
            out.append((os.path.basename(f.file_name), f.function_name, f.line_num, f.file_name))
    return out


def _scope(eqn) -> str | None:
    """The innermost `jax.named_scope` (jnp.einsum's scopes, named by its spec, excepted)."""
    stack = getattr(eqn.source_info.name_stack, "stack", ())
    names = [getattr(s, "name", "") for s in stack if type(s).__name__ == "Scope"]
    names = [n for n in names if n and "->" not in n]
    return names[-1] if names else None


def _is_compressor(frame) -> bool:
    return frame[0] == "compressor.py" or frame[1] == "compress_chunk"


def _compressor_owner(frames: list, i: int) -> str:
    """Compressor frames start at i: the source line that calls them names the indexer or not."""
    while i < len(frames) and _is_compressor(frames[i]):
        i += 1
    line = linecache.getline(frames[i][3], frames[i][2]) if i < len(frames) else ""
    return "indexer" if _INDEXER_CALL.search(line) else "compressor"


_SCORES = ("Indexer.scores", "Indexer.head_weights", "Indexer.weighted_scores")


def v4_component(eqn) -> str | None:
    """The V4 component of an equation (module docstring), or None."""
    if scope := _scope(eqn):
        return scope
    frames, via_linear, moe, block = _frames(eqn), False, False, False
    for i, (name, fn, _, path) in enumerate(frames):
        if os.sep + os.path.join("kernels", "sparse_attention") + os.sep in path:
            return "attention core"
        if _is_compressor(frames[i]):
            return _compressor_owner(frames, i)
        if name == "layers.py":
            via_linear |= fn.startswith("Linear.")
        elif name in ("experts.py", "moe_parallel.py"):
            moe = True
        elif name == "moe.py":
            return _MOE.get(fn.split(".")[0], "routed experts")
        elif name == "indexer.py":
            return "indexer scores" if fn in _SCORES and not via_linear else "indexer"
        elif name == "attention.py" or fn == "attention_chunk":
            return "attention"
        elif name == "mhc.py":
            return "mhc"
        elif name == "transformer.py" and (fn.startswith("Head.") or "embed_tokens" in fn):
            return "head" if fn.startswith("Head.") else "embed"
        elif name in ("block.py", "transformer.py", "chunk.py") and fn not in _ROW_HELPERS:
            block = True
            break
    return "routed experts" if moe else ("norms/residual" if block else None)


# ---------------------------------------------------------------------------------------------
# Primitive tables and sizes

# Value states: activations, constants, or a parameter view {(leaf, origin): fraction}.
_ACT, _CONST = "act", "const"
_CALLS = frozenset(
    "jit pjit closed_call core_call remat remat2 checkpoint custom_jvp_call custom_vjp_call "
    "custom_vjp_call_jaxpr custom_vmap_call".split()
)
_JAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr", "call")
_ELEMENTWISE = frozenset(
    "mul add sub div rem pow neg and or xor not shift_left shift_right_logical "
    "shift_right_arithmetic max min abs sign clamp integer_pow square sqrt rsqrt cbrt exp exp2 "
    "log log1p expm1 tanh logistic sin cos tan floor ceil round is_finite select_n eq ne lt le "
    "gt ge nextafter atan2 erf erf_inv reduce_precision".split()
)
_LAYOUT = frozenset(
    "convert_element_type reshape broadcast_in_dim transpose squeeze expand_dims stack "
    "bitcast_convert_type copy copy_p concatenate pad rev stop_gradient".split()
)
_SLICES = frozenset(("slice", "dynamic_slice", "gather", "split"))
_REDUCE = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin cumsum "
    "cumprod cummax cummin cumlogsumexp sort top_k".split()
)
_NO_WORK = _SLICES | _LAYOUT | frozenset(("iota", "dynamic_update_slice", "scatter"))


def _size(aval) -> int:
    return math.prod(getattr(aval, "shape", ()))


def _matmul_flops(eqn) -> float:
    p, lhs = eqn.params, eqn.invars[0].aval
    rd = p.get("ragged_dot_dimension_numbers")
    (lc, _), _ = rd.dot_dimension_numbers if rd else p["dimension_numbers"]
    flops = 2.0 * _size(eqn.outvars[0].aval) * math.prod(lhs.shape[d] for d in lc)
    if rd and any(d in lc for d in rd.lhs_ragged_dimensions):  # a group axis in the output
        flops /= eqn.invars[2].aval.shape[0]
    return flops


def _other_ops(eqn) -> float:
    if eqn.primitive.name in _REDUCE:
        return float(_size(eqn.invars[0].aval))
    if eqn.primitive.name in _NO_WORK:
        return 0.0
    return float(sum(_size(v.aval) for v in eqn.outvars))


def _union(views: list[dict]) -> dict:
    out: dict = {}
    for v in views:
        for k, f in v.items():
            out[k] = max(out.get(k, 0.0), f)
    return out


# ---------------------------------------------------------------------------------------------
# The walk


@dataclasses.dataclass(frozen=True)
class _Ctx:
    mult: float = 1.0  # product of the trip counts (and devices) around the equation
    loops: tuple[int, ...] = ()
    comp: str | None = None  # the enclosing equation's component (the fallback)
    forced: str | None = None  # a call site's component, which wins inside the call


class _Walk:
    def __init__(self, leaves: list[tuple[str, int]], classify, fallback: str):
        self.leaves, self.classify, self.fallback = leaves, classify, fallback
        self.records: list[Record] = []
        self.loops: dict[int, Loop] = {}
        self.notes: dict[str, None] = {}
        self.done: set = set()  # (leaf, origin, loops) already read
        self.origins = 0

    def add(self, comp, ctx: _Ctx, **values) -> None:
        self.records.append(Record(comp or self.fallback, loops=ctx.loops, **values))

    def slice(self, s, factor: float):
        """A view sliced by `factor`: a new origin, so reading it is a separate read."""
        if not isinstance(s, dict):
            return s
        self.origins += 1
        return _union([{(leaf, self.origins): f * factor} for (leaf, _), f in s.items()])

    def consume(self, sts, comp, ctx: _Ctx) -> None:
        for view in (s for s in sts if isinstance(s, dict)):
            for (leaf, origin), f in view.items():
                if (leaf, origin, ctx.loops) not in self.done:
                    self.done.add((leaf, origin, ctx.loops))
                    name, nbytes = self.leaves[leaf]
                    self.add(comp, ctx, weight_bytes=f * nbytes * ctx.mult, leaf=name)

    def run(self, jaxpr, states: list, ctx: _Ctx) -> list:
        """Walks `jaxpr` from input states; returns the states of its outputs."""
        env: dict = {v: _CONST for v in jaxpr.constvars}
        env.update(zip(jaxpr.invars, states, strict=True))
        known: dict = {}  # scalar ints known at trace time (while-loop bounds)
        state = lambda a: _CONST if isinstance(a, jcore.Literal) else env.get(a, _ACT)  # noqa: E731
        for eqn in jaxpr.eqns:
            comp = ctx.forced or self.classify(eqn) or ctx.comp
            handler = getattr(self, "p_" + eqn.primitive.name, self.p_default)
            outs = handler(eqn, [state(a) for a in eqn.invars], ctx, comp, known)
            env.update(zip(eqn.outvars, outs, strict=True))
            _fold(eqn, known)
        return [state(a) for a in jaxpr.outvars]

    def p_default(self, eqn, sts, ctx, comp, known) -> list:
        sub = [eqn.params[k] for k in _JAXPR_KEYS if k in eqn.params]
        if eqn.primitive.name in _CALLS or sub:
            return self.call(eqn, sub, sts, ctx, comp)
        if eqn.primitive.name in ("dot_general", "ragged_dot_general", "ragged_dot"):
            self.add(comp, ctx, flops=_matmul_flops(eqn) * ctx.mult)
        elif work := _other_ops(eqn):
            self.add(comp, ctx, elementwise=work * ctx.mult)
        return self.propagate(eqn, sts, ctx, comp)

    def propagate(self, eqn, sts, ctx, comp) -> list:
        """Output states of a plain equation; views reaching a non-view op are read."""
        n, name = len(eqn.outvars), eqn.primitive.name
        views = [s for s in sts if isinstance(s, dict)]
        if not views:
            return [_CONST if all(s == _CONST for s in sts) else _ACT] * n
        if name in _SLICES and isinstance(sts[0], dict):
            self.consume(sts[1:], comp, ctx)  # parameter-valued indices are read
            size = _size(eqn.invars[0].aval)
            return [self.slice(sts[0], _size(v.aval) / size) for v in eqn.outvars]
        if name == "gather" and sts[0] == _CONST:  # a constant table indexed by a parameter
            return [sts[1]]
        if (name in _ELEMENTWISE or name in _LAYOUT) and _ACT not in sts:
            return [_union(views)] * n
        self.consume(sts, comp, ctx)
        return [_ACT] * n

    def call(self, eqn, sub, sts, ctx, comp) -> list:
        inner = getattr(sub[0], "jaxpr", sub[0]) if sub else None
        if inner is None or len(inner.invars) != len(sts):
            self.consume(sts, comp, ctx)
            self.notes[f"{eqn.primitive.name}: body not walked, nothing counted"] = None
            return [_ACT] * len(eqn.outvars)
        if eqn.primitive.name not in _CALLS:
            self.notes[f"{eqn.primitive.name}: unknown primitive, body walked once"] = None
        forced = ctx.forced or self.classify(eqn)
        return self.run(inner, sts, dataclasses.replace(ctx, comp=comp, forced=forced))

    def loop(self, kind: str, trips: int | None, comp, ctx: _Ctx) -> _Ctx:
        i = len(self.loops)
        parent = ctx.loops[-1] if ctx.loops else None
        self.loops[i] = Loop(kind, trips, comp or self.fallback, parent)
        mult = ctx.mult * (1 if trips is None else trips)
        return dataclasses.replace(ctx, mult=mult, loops=(*ctx.loops, i), comp=comp)

    def p_scan(self, eqn, sts, ctx, comp, known) -> list:
        p = eqn.params
        n_c, n_k = _scan_split(p, len(sts))
        self.consume(sts[n_c : n_c + n_k], comp, ctx)  # parameters as carries
        xs = [self.slice(s, 1 / p["length"]) for s in sts[n_c + n_k :]]  # one step's slice
        inner = self.loop("scan", p["length"], comp, ctx)
        outs = self.run(p["jaxpr"].jaxpr, sts[:n_c] + [_ACT] * n_k + xs, inner)
        ys = [self.slice(s, p["length"]) if isinstance(s, dict) else _ACT for s in outs[n_k:]]
        return [s if isinstance(s, dict) else _ACT for s in outs[:n_k]] + ys

    def p_while(self, eqn, sts, ctx, comp, known) -> list:
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        trips = _trip_count(eqn, known)
        if trips is None:
            where = comp or self.fallback
            self.notes[f"while loop in {where}: no static trip count, body counted once"] = None
        self.consume(sts[nc + nb :], comp, ctx)
        carry, inner = [_ACT] * (len(sts) - nc - nb), self.loop("while", trips, comp, ctx)
        self.run(p["cond_jaxpr"].jaxpr, sts[:nc] + carry, inner)
        self.run(p["body_jaxpr"].jaxpr, sts[nc : nc + nb] + carry, inner)
        return [_ACT] * len(eqn.outvars)

    def p_cond(self, eqn, sts, ctx, comp, known) -> list:
        self.consume(sts[:1], comp, ctx)
        (records, done), best = (self.records, self.done), None
        for br in eqn.params["branches"]:
            self.records, self.done = [], set(done)
            outs = self.run(br.jaxpr, sts[1:], dataclasses.replace(ctx, comp=comp))
            fields = ("flops", "weight_bytes", "elementwise")
            key = [sum(getattr(r, f) for r in self.records) for f in fields]
            if best is None or key > best[0]:
                best = (key, self.records, self.done, outs)
        self.records, self.done = records + best[1], best[2]
        n = len(eqn.params["branches"])
        self.notes[f"cond in {comp or self.fallback}: the most expensive of {n} branches"] = None
        return best[3]

    def p_shard_map(self, eqn, sts, ctx, comp, known) -> list:
        p, body = eqn.params, eqn.params["jaxpr"]
        manual = p.get("newly_manual_axes") or p.get("manual_axes") or p["mesh"].axis_names
        devices = math.prod(dict(p["mesh"].shape)[a] for a in manual)
        local = [
            self.slice(s, _size(b.aval) / max(_size(a.aval), 1))
            for s, a, b in zip(sts, eqn.invars, body.invars, strict=True)
        ]
        self.run(body, local, dataclasses.replace(ctx, mult=ctx.mult * devices, comp=comp))
        return [_ACT] * len(eqn.outvars)

    def p_pallas_call(self, eqn, sts, ctx, comp, known) -> list:
        self.consume(sts, comp, ctx)
        est = eqn.params.get("cost_estimate")
        if est is not None and getattr(est, "flops", None):
            self.add(comp, ctx, flops=float(est.flops) * ctx.mult)
            self.notes["pallas_call: flops from its cost_estimate"] = None
        else:
            self.notes["pallas_call without a cost_estimate: its flops are not counted"] = None
        return [_ACT] * len(eqn.outvars)


def _scan_split(p: dict, n_in: int) -> tuple[int, int]:
    """(consts, carries) of a scan: counts from `ft_in` (jax 0.12) or the older params."""
    if "ft_in" in p:
        consts, carry, _ = (list(t) for t in p["ft_in"].update(list(range(n_in))).unpack())
        return len(consts), len(carry)
    return p["num_consts"], p["num_carry"]


# ---------------------------------------------------------------------------------------------
# Static while-loop trip counts


def _known(a, known: dict) -> int | None:
    if isinstance(a, jcore.Literal):
        v = np.asarray(a.val)
        return int(v) if v.shape == () and np.issubdtype(v.dtype, np.integer) else None
    return known.get(a)


def _fold(eqn, known: dict) -> None:
    """Records scalar integers computable at trace time (literal arithmetic)."""
    ops = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}
    vals = [_known(a, known) for a in eqn.invars]
    if len(eqn.outvars) != 1 or eqn.outvars[0].aval.shape != () or None in vals:
        return
    if eqn.primitive.name in ops and len(vals) == 2:
        known[eqn.outvars[0]] = ops[eqn.primitive.name](*vals)
    elif eqn.primitive.name in ("convert_element_type", "copy", "copy_p") and len(vals) == 1:
        known[eqn.outvars[0]] = vals[0]


def _trip_count(eqn, known: dict) -> int | None:
    """Trip count of a fori-style while loop (`i < n` / `i <= n`, `i = i + step`), else None."""
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond, body = p["cond_jaxpr"].jaxpr, p["body_jaxpr"].jaxpr
    outer = [*eqn.invars[:nc], *eqn.invars[nc + nb :]]  # what cond's inputs are bound to
    pos = {v: i for i, v in enumerate(cond.invars)}
    test = next((e for e in cond.eqns if e.outvars[0] is cond.outvars[0]), None)
    if test is None or test.primitive.name not in ("lt", "le"):
        return None
    ctr, bound = test.invars
    if not isinstance(ctr, jcore.Var) or pos.get(ctr, -1) < nc:
        return None
    if not _carried(body, nb, bound, pos, nc):
        return None
    j = pos[ctr] - nc  # the counter's carry slot
    lo = _known(outer[j + nc], known)
    literal = isinstance(bound, jcore.Literal)
    hi = _known(bound, {}) if literal else _known(outer[pos[bound]], known)
    step = _step(body, nb + j, body.outvars[j])
    if None in (lo, hi, step) or step <= 0:
        return None
    return max(0, -(-(hi - lo + (test.primitive.name == "le")) // step))


def _carried(body, nb: int, bound, pos: dict, nc: int) -> bool:
    """The bound is a literal, a cond constant, or a carry the body passes on unchanged."""
    if isinstance(bound, jcore.Literal):
        return True
    if bound not in pos:  # not an input of cond: not a loop bound we can read
        return False
    if pos[bound] < nc:
        return True
    j = pos[bound] - nc
    return body.outvars[j] is body.invars[nb + j]


def _step(body, slot: int, out) -> int | None:
    e = next((e for e in body.eqns if e.outvars and e.outvars[0] is out), None)
    if e is None or e.primitive.name != "add":
        return None
    a, b = e.invars
    if a is body.invars[slot]:
        return _known(b, {})
    return _known(a, {}) if b is body.invars[slot] else None


# ---------------------------------------------------------------------------------------------
# Entry points


def count_jaxpr(
    closed, leaves: Sequence[tuple[str, int] | None], *, classify=v4_component, fallback="other"
) -> Report:
    """Counts a ClosedJaxpr whose inputs are described by `leaves`: (name, bytes) for each
    parameter input, None for the others."""
    if len(leaves) != len(closed.jaxpr.invars):
        n = len(closed.jaxpr.invars)
        raise ValueError(f"{len(leaves)} leaf descriptions for {n} jaxpr inputs")
    named = [lf for lf in leaves if lf is not None]
    states, i = [], 0
    for lf in leaves:
        states.append(_ACT if lf is None else {(i, 0): 1.0})
        i += lf is not None
    walk = _Walk(named, classify, fallback)
    walk.run(closed.jaxpr, states, _Ctx())
    return Report(tuple(walk.records), walk.loops, dict(named), tuple(walk.notes))


def count(
    fn: Callable,
    *args,
    params: int | Sequence[int] = (),
    static_argnums: Sequence[int] = (),
    fresh: bool = False,
    **kw,
) -> Report:
    """Traces `fn(*args)` (abstract arguments are fine) and counts it; the leaves of the
    positional arguments numbered in `params` are the parameters whose bytes are tracked.

    A `jax.jit` function is traced through its Python function (its compiler options do not
    matter here); name its static arguments in `static_argnums`. `fresh=True` clears JAX's
    staging caches first (`jax.clear_caches`): they key traces (of jit, and of `lax.scan` and
    other loop bodies) by function and shapes, not by trace-time switches such as
    `experts.implementation`, so a program traced before under another setting would be counted
    instead. Later calls in the process then recompile."""
    params = (params,) if isinstance(params, int) else tuple(params)
    if any(not 0 <= i < len(args) for i in (*params, *static_argnums)):
        raise ValueError(f"params={params}: argument numbers must be in [0, {len(args)})")
    if fresh:
        jax.clear_caches()
    raw = fn.__wrapped__ if hasattr(fn, "lower") and hasattr(fn, "__wrapped__") else fn
    closed = jax.make_jaxpr(raw, static_argnums=tuple(static_argnums))(*args)
    dynamic = tuple(None if i in static_argnums else a for i, a in enumerate(args))
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(dynamic)[0]:
        if path[0].idx not in params:
            leaves.append(None)
            continue
        nbytes = math.prod(np.shape(leaf)) * np.dtype(jax.numpy.result_type(leaf)).itemsize
        name = jax.tree_util.keystr(path[1:], simple=True, separator=".").removesuffix(".value")
        if len(params) > 1 or not name:  # several parameter arguments: name the argument too
            name = f"{path[0].idx}.{name}" if name else str(path[0].idx)
        leaves.append((name, nbytes))
    return count_jaxpr(closed, leaves, **kw)
