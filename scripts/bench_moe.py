"""One MoE layer (router + routed experts + shared expert): the dense specification path (every
expert on every token) vs the automatic dropless path, side by side. Writes JSON with --out.

    .venv/bin/python scripts/bench_moe.py [--out PATH] [--dim D] [--inter F] [--reps N]
    .venv/bin/python scripts/bench_moe.py --gpu [--out PATH]  (smaller: --dim --inter --experts
        --tokens; e.g. a CPU smoke run of the --gpu code: --dim 256 --inter 128 --experts 16)

CPU (default): wall time (jit, after warm-up, median of --reps calls) at k = 6 and E = 16, 64,
256 experts, 8 and 512 tokens, at a moderate width (default D = 256, F = 128, FP4 experts,
reference numerics) so the sweep takes a couple of minutes on 2 cores. The dense path grows
with E (it runs E experts on every token); the grouped path should not: the ratio
t(E=256) / t(E=16) is printed for each.

--gpu: Flash width (D = 4096, F = 2048, E = 256, k = 6, FP4 experts). The grouped (ragged)
layer's useful TFLOP/s at T = 4096 (routed 2 T k 3 D F + shared 2 T 3 D F + router 2 T D E,
over the measured time) against the bf16 matrix peak, and a batch-1 decode step's weight
bandwidth (bytes of the k routed experts, the shared expert and the router read, over the
time; the step is timed over distinct tokens so routed experts are rarely reused from cache)
against the memory bandwidth peak. Peaks from NVIDIA's H100 / H200 datasheets.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax import cli
from v4jax.config import tiny
from v4jax.model import experts
from v4jax.model.moe import MoE
from v4jax.numerics import Precision
from v4jax.numerics.policy import jit

DATASHEET = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}  # bytes/s, bf16 FLOP/s


def build(dim: int, inter: int, e: int, k: int, fmt: str, seed: int = 0):
    """A MoE layer with random weights in the release formats -> (graphdef, state)."""
    cfg = tiny(dim=dim, moe_inter_dim=inter, num_experts=e, experts_per_token=k, expert_dtype=fmt)
    graphdef, state = nnx.split(MoE(cfg, False, Precision()))
    leaves, tree = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return graphdef, jax.tree_util.tree_unflatten(
        tree, [_fill(a, q) for a, q in zip(leaves, keys, strict=True)]
    )


def _fill(a: jnp.ndarray, key) -> jnp.ndarray:
    if a.dtype == jnp.int8:  # packed FP4 codes
        return jax.random.randint(key, a.shape, -128, 128, jnp.int32).astype(jnp.int8)
    if a.dtype == jnp.float8_e8m0fnu:  # scales: 2^-6 keeps activations O(1) at these widths
        return jnp.full(a.shape, 2.0**-6, jnp.float32).astype(a.dtype)
    if a.dtype == jnp.float8_e4m3fn:
        return (2 * jax.random.normal(key, a.shape)).astype(a.dtype)
    if a.dtype == jnp.bfloat16:  # router weight
        return (jax.random.normal(key, a.shape) / np.sqrt(a.shape[-1])).astype(a.dtype)
    return jnp.zeros(a.shape, a.dtype)  # router bias


def layer(graphdef, impl: str):
    """The jitted layer (x [1, T, D], ids [1, T]) -> [1, T, D] traced under `impl`."""

    def f(state, x, ids):
        with experts.implementation(impl):
            return nnx.merge(graphdef, state)(x, ids)

    return jit(f)


def median_time(f, args_list, reps: int) -> float:
    """Median seconds per call over `reps` calls cycling through `args_list` (after warm-up)."""
    jax.block_until_ready(f(*args_list[0]))
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args_list[i % len(args_list)]))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inputs(t: int, dim: int, n: int, seed: int = 1):
    keys = jax.random.split(jax.random.key(seed), n)
    x = [jax.random.normal(q, (1, t, dim)).astype(jnp.bfloat16) for q in keys]
    return x, jnp.zeros((1, t), jnp.int32)


def cpu(args) -> dict:
    rows = []
    args.dim, args.inter = args.dim or 256, args.inter or 128
    for e in (16, 64, 256):
        graphdef, state = build(args.dim, args.inter, e, 6, "fp4")
        for t in (8, 512):
            xs, ids = inputs(t, args.dim, 1)
            for impl in ("dense", "auto"):
                with experts.implementation(impl):
                    path = experts.choose(t * 6, e)
                s = median_time(layer(graphdef, impl), [(state, xs[0], ids)], args.reps)
                rows.append(dict(experts=e, tokens=t, impl=impl, path=path, seconds=s))
                print(f"E={e:4d} T={t:4d} {impl:6s} ({path:6s}) {s * 1e3:9.2f} ms", flush=True)
    ratios = {}
    for t in (8, 512):
        for impl in ("dense", "auto"):
            sec = {
                r["experts"]: r["seconds"] for r in rows if (r["tokens"], r["impl"]) == (t, impl)
            }
            ratios[f"T={t} {impl}"] = sec[256] / sec[16]
    print(f"\nD={args.dim} F={args.inter} k=6 FP4 experts, reference numerics; t(256)/t(16):")
    print(f"{'':10s} {'dense (old)':>12s} {'auto (new)':>12s}")
    for t in (8, 512):
        print(f"T={t:<8d} {ratios[f'T={t} dense']:12.2f} {ratios[f'T={t} auto']:12.2f}")
    return dict(dim=args.dim, inter=args.inter, k=6, fmt="fp4", rows=rows, ratios=ratios)


def gpu(args) -> dict:
    d, f, e, k, t = args.dim or 4096, args.inter or 2048, args.experts, 6, args.tokens
    kind = jax.devices()[0].device_kind
    bw, peak = next((v for n, v in DATASHEET.items() if n in kind), (None, None))
    graphdef, state = build(d, f, e, k, "fp4")
    xs, ids = inputs(t, d, 2)
    flops = 2 * t * (k * 3 * d * f + 3 * d * f + d * e)
    out = dict(device=kind, dim=d, inter=f, experts=e, k=k, tokens=t, flops=flops)
    for impl in ("auto", "dense"):
        with experts.implementation(impl):
            path = out[f"prefill_{impl}_path"] = experts.choose(t * k, e)
        s = median_time(layer(graphdef, impl), [(state, x, ids) for x in xs], args.reps)
        out[f"prefill_{impl}_seconds"] = s
        out[f"prefill_{impl}_tflops"] = flops / s / 1e12
        print(f"T={t} {impl} ({path}): {s * 1e3:8.2f} ms {flops / s / 1e12:7.1f} TFLOP/s")
    xs, ids = inputs(1, d, 64, seed=2)
    s = median_time(layer(graphdef, "auto"), [(state, x, ids) for x in xs], 64)
    routed = k * 3 * (f * d // 2 + f * d // 32)  # packed FP4 + E8M0 per 32
    shared = 3 * (f * d + (f // 128) * (d // 128))  # FP8 + E8M0 per 128 x 128
    nbytes = routed + shared + e * d * 2  # + bf16 router weight
    out.update(decode_seconds=s, decode_bytes=nbytes, decode_bytes_per_s=nbytes / s)
    print(f"decode T=1: {s * 1e6:8.1f} us, {nbytes / s / 1e9:7.1f} GB/s", flush=True)
    if bw:
        out.update(peak_bytes_per_s=bw, peak_flops=peak)
        out["prefill_fraction_of_peak"] = out["prefill_auto_tflops"] * 1e12 / peak
        out["decode_fraction_of_peak_bw"] = nbytes / s / bw
        print(
            f"fractions of peak: prefill {out['prefill_fraction_of_peak']:.2f}, "
            f"decode bandwidth {out['decode_fraction_of_peak_bw']:.2f}"
        )
    return out


def check_args(ap: cli.Parser, args: argparse.Namespace) -> None:
    """Every flag before anything is built or timed; --out's folder is created now."""
    for flag, v in (("--dim", args.dim), ("--inter", args.inter)):
        if v is not None and (v < 128 or v % 128):
            ap.fail(f"{flag} must be a positive multiple of 128 (FP8 blocks), not {v}")
    if args.experts < 6:
        ap.fail(f"--experts must be >= 6 (6 routed experts per token), not {args.experts}")
    for flag, v in (("--tokens", args.tokens), ("--reps", args.reps)):
        if v < 1:
            ap.fail(f"{flag} must be >= 1, not {v}")
    cli.output_file("--out", args.out)


def main(argv: list[str] | None = None) -> None:
    ap = cli.Parser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--gpu", action="store_true", help="Flash-width GPU measurement")
    ap.add_argument("--dim", type=int, help="D (default: 256 CPU sweep, 4096 --gpu)")
    ap.add_argument("--inter", type=int, help="F, a multiple of 128 (default: 128 / 2048)")
    ap.add_argument("--experts", type=int, default=256, help="E (--gpu)")
    ap.add_argument("--tokens", type=int, default=4096, help="prefill tokens (--gpu)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per point")
    args = ap.parse_args(argv)
    check_args(ap, args)
    res = gpu(args) if args.gpu else cpu(args)
    res.update(backend=jax.default_backend(), host=platform.node(), jax=jax.__version__)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
