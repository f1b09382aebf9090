"""Sparse-attention forward: Pallas kernel vs the jnp reference (XLA) vs dense attention with a
mask, side by side at V4 shapes, each against the op's floor. Writes JSON.

    .venv/bin/python scripts/bench_attention.py [--small] [--json PATH] [--batch B] [--backward]

`--backward`: forward + backward (one `jax.vjp` and its pullback: dq, dkv, dsink) at the
prefill (training) shapes: Pallas kernel forward + backward vs the reference with its jnp
backward (`reference_bwd.py`) vs plain autodiff of the reference, all under XLA otherwise.
FLOPs = 14 H D per valid entry (forward QK, PV; backward QK again, dO.V, dS.K, dS^T.Q, P^T.dO),
against the measured matmul rate. `err` = the largest max|grad - reference grad| / max|reference
grad| over the three gradients.

Shapes (head dim 512, bf16): Flash = 64 heads, top-512; Pro = 128 heads, top-1024; every query
attends to its 128-token window plus its top-k compressed entries (a CSA layer, ratio 4).
Decode: one token per sequence, B sequences, contexts 8K / 64K / 1M (pool = 128 window rows +
context / 4 compressed entries per sequence). Prefill: one sequence of 4K / 8K / 16K tokens
(pool = the tokens' own rows + S / 4 entries; causal window; top-k among visible entries).

The floor is the op's, the same for the three implementations: bytes = each gathered row once
per query token (decode; prefill: the pool once) + q + out + indices, over the memory
bandwidth; FLOPs = 4 H D per valid index entry (QK and PV), over the matrix rate. Both
ceilings are measured here (a device copy, a bf16 matmul) and the datasheet values are kept in
the JSON. `fraction` = floor / time.

`--small` (for a CPU): scaled-down shapes; the Pallas kernel runs in the interpreter for a
correctness check only (not timed: interpreter times mean nothing); the two XLA paths are
timed. On a GPU or TPU the kernel is timed, with a few block-size variants on GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from v4jax import cli
from v4jax.kernels.sparse_attention import BackwardBlockSizes, BlockSizes, sparse_attention
from v4jax.kernels.sparse_attention.reference import sparse_attention_reference

DATASHEET = {  # bytes/s, bf16 dense FLOP/s (NVIDIA datasheets)
    "H100": (3.35e12, 989e12),
    "H200": (4.8e12, 989e12),
}
GPU_VARIANTS = [  # (heads, num_warps, num_stages); None = the default for the shape
    None,
    BlockSizes(heads=64, num_warps=8, num_stages=3),
    BlockSizes(heads=32, num_warps=8, num_stages=2),
]
GPU_BWD_VARIANTS = [  # backward (rows, heads, num_warps); None = 32 rows x 32 heads x 8 warps
    None,
    BackwardBlockSizes(rows=16, heads=16, num_warps=4),
    BackwardBlockSizes(rows=32, heads=16, num_warps=4),
    BackwardBlockSizes(rows=16, heads=32, num_warps=4),
]


@dataclasses.dataclass(frozen=True)
class Shape:
    model: str
    mode: str  # decode | prefill
    b: int
    s: int
    h: int
    d: int
    window: int
    topk: int
    ctx: int  # context tokens (decode) or prompt tokens (prefill)

    @property
    def n(self) -> int:  # pool rows per sequence
        comp = self.ctx // 4
        return self.window + comp if self.mode == "decode" else self.s + comp

    @property
    def name(self) -> str:
        return f"{self.model} {self.mode} ctx={self.ctx} B={self.b} S={self.s}"


def shapes(small: bool, batch: int) -> list[Shape]:
    if small:
        models, d, win = [("flash-small", 16, 64), ("pro-small", 32, 128)], 128, 32
        dec, pre, batch = [512, 4096], [256], min(batch, 4)
    else:
        models, d, win = [("flash", 64, 512), ("pro", 128, 1024)], 512, 128
        dec, pre = [8192, 65536, 1 << 20], [4096, 8192, 16384]
    out = []
    for name, h, k in models:
        out += [Shape(name, "decode", batch, 1, h, d, win, k, c) for c in dec]
        out += [Shape(name, "prefill", 1, s, h, d, win, k, s) for s in pre]
    return out


def make_pool(sh: Shape, seed: int = 0) -> jnp.ndarray:
    """[B, N, D] bf16, generated one sequence at a time (1M context, B=64: 17 GB)."""
    keys = jax.random.split(jax.random.key(seed), sh.b)
    return jax.lax.map(lambda k: jax.random.normal(k, (sh.n, sh.d), jnp.bfloat16), keys)


def make_queries(sh: Shape, seed: int):
    """q, idx, sink. Indices: the window rows, then top-k distinct compressed entries (as the
    indexer picks them; duplicates would also make the dense baseline a different function)."""
    kq, ki, ks = jax.random.split(jax.random.key(1000 + seed), 3)
    q = jax.random.normal(kq, (sh.b, sh.s, sh.h, sh.d), jnp.bfloat16)
    sink = jax.random.normal(ks, (sh.h,), jnp.float32)
    n_comp = sh.ctx // 4
    kk = min(sh.topk, n_comp)  # fewer entries than k: the rest are -1
    if sh.mode == "decode":  # window ring rows [0, W), then k distinct entries
        win = jnp.broadcast_to(jnp.arange(sh.window), (sh.b, 1, sh.window))
        _, pick = jax.lax.top_k(jax.random.uniform(ki, (sh.b, 1, n_comp)), kk)
        comp = sh.window + pick
    else:  # token t: rows t-W+1 .. t; k distinct among the (t + 1) // 4 complete entries
        t = jnp.arange(sh.s)[:, None]
        rows = t - sh.window + 1 + jnp.arange(sh.window)[None]
        win = jnp.where(rows >= 0, rows, -1)[None]
        visible = (t + 1) // 4  # [S, 1]
        score = jax.random.uniform(ki, (1, sh.s, n_comp))
        score = jnp.where(jnp.arange(n_comp)[None, None] < visible[None], score, -1.0)
        _, pick = jax.lax.top_k(score, kk)  # visible ones first (scores >= 0)
        comp = jnp.where(jnp.arange(kk)[None, None] < visible[None], sh.s + pick, -1)
    comp = jnp.pad(comp, ((0, 0), (0, 0), (0, sh.topk - kk)), constant_values=-1)
    return q, jnp.concatenate([win, comp], axis=-1).astype(jnp.int32), sink


def dense_masked(q, kv, idx, sink, *, scale: float, chunk: int = 256):
    """Baseline: attention over the whole pool with a mask built from the index sets (what a
    dense implementation does), query tokens in chunks so the scores fit in memory."""
    b, s, h, d = q.shape
    n = kv.shape[1]
    bi, si = jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None]
    mask = jnp.zeros((b, s, n), bool).at[bi, si, jnp.maximum(idx, 0)].max(idx >= 0)
    c = min(chunk, s)

    def one(args):  # [B, c, H, D], [B, c, N]
        qc, mc = args
        sc = jnp.einsum("bchd,bnd->bchn", qc, kv, preferred_element_type=jnp.float32) * scale
        sc = jnp.where(mc[:, :, None, :], sc, -jnp.inf)
        m = jnp.maximum(jnp.max(sc, axis=-1), sink[None, None, :])
        p = jnp.exp(sc - m[..., None])
        den = jnp.sum(p, axis=-1) + jnp.exp(sink[None, None, :] - m)
        o = jnp.einsum("bchn,bnd->bchd", p.astype(q.dtype), kv, preferred_element_type=jnp.float32)
        return (o / den[..., None]).astype(q.dtype)

    qs = q.reshape(b, s // c, c, h, d).swapaxes(0, 1)
    ms = mask.reshape(b, s // c, c, n).swapaxes(0, 1)
    return jax.lax.map(one, (qs, ms)).swapaxes(0, 1).reshape(b, s, h, d)


def floor_of(sh: Shape, valid: int, ceil: dict) -> dict:
    item = 2  # bf16
    qo = 2 * sh.b * sh.s * sh.h * sh.d * item
    rows = valid * sh.d * item if sh.mode == "decode" else sh.b * sh.n * sh.d * item
    nbytes = rows + qo + sh.b * sh.s * (sh.window + sh.topk) * 4
    flops = 4 * sh.h * sh.d * valid
    t_mem, t_mac = nbytes / ceil["bandwidth"], flops / ceil["flops"]
    return dict(bytes=nbytes, flops=flops, t_mem=t_mem, t_compute=t_mac, t_floor=max(t_mem, t_mac))


def median_time(fn, arg_sets, max_reps: int, budget_s: float = 3.0) -> float:
    """Median over repetitions of (time of `inner` back-to-back calls, rotating input sets) /
    inner; `inner` makes a repetition last >= 20 ms, the repetitions fit in ~`budget_s`."""
    jax.block_until_ready(fn(*arg_sets[0]))  # compile + warm up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[-1]))
    one = time.perf_counter() - t0
    inner = int(min(50, max(1, 0.02 // max(one, 1e-6))))
    reps = int(min(max_reps, max(3, budget_s // (one * inner))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [fn(*arg_sets[i % len(arg_sets)]) for i in range(inner)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def measure_ceilings(small: bool) -> dict:
    """Device copy bandwidth (read + write) and bf16 matmul rate (f32 on CPU), measured."""
    n = (1 << 23) if small else (1 << 28)  # 32 MiB / 1 GiB of f32
    x = jnp.ones((n,), jnp.float32)
    copy = jax.jit(lambda x: x * 2)
    t_copy = median_time(copy, [(x,)], 10)
    m = 1024 if small else 8192
    dt = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    a = jax.random.normal(jax.random.key(0), (m, m), dt)
    mm = jax.jit(lambda a: a @ a)
    t_mm = median_time(mm, [(a,)], 10)
    kind = jax.devices()[0].device_kind
    sheet = next((v for k, v in DATASHEET.items() if k in kind), None)
    return dict(
        bandwidth=2 * n * 4 / t_copy,
        flops=2 * m**3 / t_mm,
        datasheet_bandwidth=sheet[0] if sheet else None,
        datasheet_flops=sheet[1] if sheet else None,
    )


def _impls(small: bool, scale: float) -> dict[str, tuple]:
    """name -> (function, timed). On CPU the kernel is interpreted: checked, not timed."""
    run = functools.partial(sparse_attention, scale=scale)
    out = {
        "reference": (jax.jit(functools.partial(run, implementation="reference")), True),
        "dense-mask": (jax.jit(functools.partial(dense_masked, scale=scale)), True),
    }
    if small:
        kernel = functools.partial(run, implementation="pallas", interpret=True)
        return {**out, "pallas (interpreted)": (jax.jit(kernel), False)}
    variants = GPU_VARIANTS if jax.default_backend() == "gpu" else [None]
    for v in variants:
        tag = "" if v is None else f" h{v.heads}w{v.num_warps}s{v.num_stages}"
        fn = jax.jit(functools.partial(run, implementation="pallas", blocks=v))
        out["pallas" + tag] = (fn, True)
    return out


def _rel_err(out, ref) -> float:
    """max |out - ref| / max |ref| (one bf16 ulp of the output scale: 3.9e-3 to 7.8e-3)."""
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))


def run_shape(sh: Shape, ceil: dict, small: bool, reps: int) -> list[dict]:
    scale = sh.d**-0.5
    kv = make_pool(sh)
    sets = [make_queries(sh, seed) for seed in range(1 if small else 2)]  # rotated: no L2 reuse
    arg_sets = [(q, kv, idx, sink) for q, idx, sink in sets]
    valid = int(jnp.sum(arg_sets[0][2] >= 0))
    fl = floor_of(sh, valid, ceil)
    base = dict(shape=dataclasses.asdict(sh), name=sh.name, valid_entries=valid, **fl)
    rows, ref = [], None
    for impl, (fn, timed) in _impls(small, scale).items():
        row = dict(base, impl=impl)
        try:  # correct first: every implementation against the reference on the same inputs
            out = fn(*arg_sets[0])
            ref = out if impl == "reference" else ref
            row["rel_err"] = None if ref is None else _rel_err(out, ref)
            del out
            if timed:
                t = median_time(fn, arg_sets, reps, budget_s=1.0 if small else 3.0)
                row.update(time_s=t, fraction=fl["t_floor"] / t, tflops=fl["flops"] / t / 1e12)
                row["gbps"] = fl["bytes"] / t / 1e9
        except Exception as e:  # e.g. the reference's gathered rows do not fit at long prefill
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
    return rows


def _vjp_fn(op):
    """(q, kv, idx, sink, g) -> (dq, dkv, dsink) of `op(q, kv, idx, sink)`: forward + backward."""

    def run(q, kv, idx, sink, g):
        return jax.vjp(lambda q, kv, sink: op(q, kv, idx, sink), q, kv, sink)[1](g)

    return jax.jit(run)


def _bwd_impls(small: bool, scale: float) -> dict[str, tuple]:
    """name -> (fwd+bwd function, timed); the first is the accuracy reference."""
    run = functools.partial(sparse_attention, scale=scale)
    out = {
        "reference": (_vjp_fn(functools.partial(run, implementation="reference")), True),
        "autodiff": (_vjp_fn(functools.partial(sparse_attention_reference, scale=scale)), True),
    }
    if small:
        kernel = functools.partial(run, implementation="pallas", interpret=True)
        return {**out, "pallas (interpreted)": (_vjp_fn(kernel), False)}
    variants = GPU_BWD_VARIANTS if jax.default_backend() == "gpu" else [None]
    for v in variants:
        tag = "" if v is None else f" bwd r{v.rows}h{v.heads}w{v.num_warps}"
        op = functools.partial(run, implementation="pallas", backward_blocks=v)
        out["pallas" + tag] = (_vjp_fn(op), True)
    return out


def _grad_err(got, ref) -> float:
    return max(_rel_err(x, r) for x, r in zip(got, ref, strict=True))


def backward_floor(sh: Shape, valid: int, ceil: dict) -> dict:
    """Forward + backward: 14 H D FLOPs per valid entry; bytes: the pool read twice, q, o,
    dO and dq once each (bf16), dkv written once in fp32."""
    act = sh.b * sh.s * sh.h * sh.d * 2
    nbytes = 2 * sh.b * sh.n * sh.d * 2 + 4 * act + sh.b * sh.n * sh.d * 4
    flops = 14 * sh.h * sh.d * valid
    t_mem, t_mac = nbytes / ceil["bandwidth"], flops / ceil["flops"]
    return dict(bytes=nbytes, flops=flops, t_mem=t_mem, t_compute=t_mac, t_floor=max(t_mem, t_mac))


def run_shape_backward(sh: Shape, ceil: dict, small: bool, reps: int) -> list[dict]:
    scale = sh.d**-0.5
    kv = make_pool(sh)
    arg_sets = []
    for seed in range(1 if small else 2):
        q, idx, sink = make_queries(sh, seed)
        g = jax.random.normal(jax.random.key(2000 + seed), q.shape, q.dtype)
        arg_sets.append((q, kv, idx, sink, g))
    valid = int(jnp.sum(arg_sets[0][2] >= 0))
    fl = backward_floor(sh, valid, ceil)
    base = dict(shape=dataclasses.asdict(sh), name=sh.name, valid_entries=valid, **fl)
    rows, ref = [], None
    for impl, (fn, timed) in _bwd_impls(small, scale).items():
        row = dict(base, impl=impl, mode="backward")
        try:
            out = fn(*arg_sets[0])
            ref = out if impl == "reference" else ref
            row["rel_err"] = None if ref is None else _grad_err(out, ref)
            del out
            if timed:
                t = median_time(fn, arg_sets, reps, budget_s=1.0 if small else 3.0)
                row.update(time_s=t, fraction=fl["t_floor"] / t, tflops=fl["flops"] / t / 1e12)
                row["gbps"] = fl["bytes"] / t / 1e9
        except Exception as e:  # e.g. the reference's [S, K, D] gathers at long prefill
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
    return rows


def _line(r: dict) -> str:
    head = f"{r['name']:38s} {r['impl']:22s}"
    err = "" if r.get("rel_err") is None else f"  err {r['rel_err']:.1e}"
    if "error" in r:
        return f"{head} FAILED {r['error'][:60]}"
    if "time_s" not in r:
        return f"{head} (not timed){err}"
    return (
        f"{head} {r['time_s'] * 1e6:11.1f} us  floor {r['t_floor'] * 1e6:9.1f} us "
        f"({'mem' if r['t_mem'] >= r['t_compute'] else 'mac'}) {r['fraction']:6.1%} "
        f"{r['tflops']:7.2f} TFLOP/s {r['gbps']:8.1f} GB/s{err}"
    )


def selected(a: argparse.Namespace, small: bool) -> list[Shape]:
    """The shapes this run measures (--only, --backward: prefill shapes only)."""
    return [
        sh
        for sh in shapes(small, a.batch)
        if (not a.only or a.only in sh.name) and (not a.backward or sh.mode == "prefill")
    ]


def check_args(ap: cli.Parser, a: argparse.Namespace, small: bool) -> None:
    """Every flag before anything is measured; --json's folder is created now."""
    if a.batch < 1:
        ap.fail(f"--batch must be >= 1, not {a.batch}")
    if a.reps is not None and a.reps < 1:
        ap.fail(f"--reps must be >= 1, not {a.reps}")
    if not selected(a, small):
        mode = " among the prefill shapes (--backward)" if a.backward else ""
        example = shapes(small, a.batch)[-1].name
        ap.fail(f"--only {a.only!r} matches no shape{mode}; names look like {example!r}")
    cli.output_file("--json", a.json)


def main(argv: list[str] | None = None) -> None:
    ap = cli.Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="scaled-down shapes (CPU)")
    ap.add_argument("--json", default="bench_attention.json")
    ap.add_argument("--batch", type=int, default=64, help="decode sequences")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--only", default=None, help="substring filter on shape names")
    ap.add_argument("--backward", action="store_true", help="fwd+bwd at the prefill shapes")
    a = ap.parse_args(argv)
    backend = jax.default_backend()
    small = a.small or backend == "cpu"
    check_args(ap, a, small)
    reps = a.reps or (5 if small else 20)
    ceil = measure_ceilings(small)
    print(
        f"device {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}; measured "
        f"copy {ceil['bandwidth'] / 1e9:.1f} GB/s, matmul {ceil['flops'] / 1e12:.2f} TFLOP/s"
    )
    if small:
        print("small shapes; Pallas kernel interpreted for correctness only, XLA paths timed")
    print("err = max|out - reference| / max|reference| (1 bf16 ulp of the scale: 3.9e-3..7.8e-3)")
    rows = []
    for sh in selected(a, small):
        run = run_shape_backward if a.backward else run_shape
        for r in run(sh, ceil, small, reps):
            print(_line(r), flush=True)
            rows.append(r)
    meta = dict(
        device=jax.devices()[0].device_kind,
        backend=backend,
        jax=jax.__version__,
        host=platform.node(),
        small=small,
        mode="backward" if a.backward else "forward",
        ceilings=ceil,
    )
    with open(a.json, "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
