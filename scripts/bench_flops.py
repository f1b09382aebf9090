"""Measured vs ideal FLOPs of a V4-Flash prefill and weight bytes of a batch-1 decode step, per
component and per routed-expert implementation, counted on the traced program (`v4jax.cost`).

Nothing is allocated: the model is full-width Flash (`config.flash()`) cut to 4 layers, one of
each layer kind Flash has (layer 0 window + hash routing, 1 CSA + hash, 2 HCA, 3 CSA; Flash:
2 / 1 / 20 / 20 of them), traced abstractly with `jax.ShapeDtypeStruct` parameters.

* Prefill: the `Model.logits` program (`api._logits`) at batch 1, T tokens. Ideal FLOPs =
  2 x the matmul parameters each token touches (attention projections, both compressors,
  indexer projections, router, k routed + the shared expert, mHC, head) + attention scores
  and P.V over the entries each query sees (window min(t+1, W), plus min(top-k, visible
  CSA entries) or the visible HCA entries) + indexer scores over the visible CSA entries.
* Decode: `decode.steps._chunk` (the `Model.decode_step` program) on one token with an abstract
  cache: parameter bytes read vs the active bytes (every non-expert leaf whole, k / E of the
  routed experts, one row of the embedding and of `tid2eid`; the MTP block is not used).
* Full model: each traced layer is one top-level scan (one segment); the per-layer numbers of
  each kind are multiplied by the number of Flash layers of that kind and the rest (embedding,
  head, final norm) is added once. Exact: per-layer costs depend only on the kind and T.

Usage: python scripts/bench_flops.py [--tokens 4096] [--context 4096] [--impl dense tiles ...]
       [--out flops.json]. Goals: total <= 1.15x ideal, routed experts <= 1.1x, decode bytes
       <= 1.2x active.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import jax
import jax.numpy as jnp

from v4jax import api, cli, config, cost
from v4jax.config import Attn, LayerKind, layer_plan
from v4jax.decode import init_cache, steps
from v4jax.model import experts
from v4jax.numerics import Numerics, Precision

IMPLS = ("dense", "ragged", "tiles", "gather", "auto")  # auto: by rows and backend
ORDER = (
    "attention",
    "attention core",
    "compressor",
    "indexer",
    "indexer scores",
    "router",
    "routed experts",
    "shared expert",
    "mhc",
    "head",
    "norms/residual",
    "embed",
    "other",
)
GOALS = {"total": 1.15, "routed experts": 1.1, "decode bytes": 1.2}


def bench_config(full: config.ModelConfig) -> config.ModelConfig:
    """`full` at full width with 4 layers: window + hash, CSA + hash, HCA, CSA."""
    return full.replace(num_layers=4, num_hash_layers=2, compress_ratios=(0, 4, 128, 4, 0))


def layer_counts(cfg: config.ModelConfig) -> dict[LayerKind, int]:
    out: dict[LayerKind, int] = {}
    for i in range(cfg.num_layers):
        out[cfg.layer_kind(i)] = out.get(cfg.layer_kind(i), 0) + 1
    return out


# ---------------------------------------------------------------------------------------------
# Ideal FLOPs


def ideal_layer(c: config.ModelConfig, kind: LayerKind, t: int) -> dict[str, float]:
    """Ideal FLOPs of one layer of `kind` over a prefill of t tokens (batch 1)."""
    d, h, k, q = c.dim, c.num_heads, c.head_dim, c.q_lora_rank
    ratio = int(kind.attn)
    pos = range(1, t + 1)  # t + 1 for the query at position t
    entries = sum(min(p, c.window_size) for p in pos)
    if kind.attn is Attn.CSA:
        entries += sum(min(c.index_topk, p // 4) for p in pos)
    elif kind.attn is Attn.HCA:
        entries += sum(p // ratio for p in pos)
    attn_params = d * q + q * h * k + d * k + c.o_lora_rank * h * k + c.o_groups * c.o_lora_rank * d
    ffn = 3 * d * c.moe_inter_dim
    n = c.hc_mult
    out = {
        "attention": 2.0 * t * attn_params,
        "attention core": 4.0 * h * k * entries,
        "router": 2.0 * t * d * c.num_experts,
        "routed experts": 2.0 * t * c.experts_per_token * ffn,
        "shared expert": 2.0 * t * ffn,
        "mhc": 2 * 2.0 * t * (c.mix_hc * n * d + n * n * d),
    }
    if ratio:
        width = (2 if ratio == 4 else 1) * k
        out["compressor"] = 2.0 * t * 2 * d * width
    if kind.attn is Attn.CSA:
        ih, ik = c.index_heads, c.index_head_dim
        out["indexer"] = 2.0 * t * (q * ih * ik + d * ih + 2 * d * 2 * ik)
        out["indexer scores"] = 2.0 * ih * ik * sum(p // 4 for p in pos)
    return out


def ideal_rest(c: config.ModelConfig, t: int) -> dict[str, float]:
    """Outside the layers: the head and the hc_head stream collapse (counted under mhc)."""
    n = c.hc_mult
    return {"head": 2.0 * t * c.dim * c.vocab_size, "mhc": 2.0 * t * n * n * c.dim}


# ---------------------------------------------------------------------------------------------
# Measurement


def _segments(report: cost.Report, cfg: config.ModelConfig) -> list[int]:
    """Top-level scan ids, one per segment (each one layer in the bench config)."""
    top = sorted(i for i, lp in report.loops.items() if lp.parent is None and lp.kind == "scan")
    plan = layer_plan(cfg)
    if len(top) != len(plan) or any(s.num_layers != 1 for s in plan):
        raise RuntimeError(f"expected one top-level scan per layer, got {len(top)} for {plan}")
    return top


def per_layer(report: cost.Report, cfg, field: str = "flops") -> dict:
    """`field` per component of each traced layer kind (key: the kind) and of the rest (None)."""
    kind_of = dict(zip(_segments(report, cfg), (s.kinds[0] for s in layer_plan(cfg)), strict=True))
    out: dict = {}
    for r in report.records:
        if v := getattr(r, field):
            d = out.setdefault(kind_of[r.loops[0]] if r.loops else None, {})
            d[r.component] = d.get(r.component, 0.0) + v
    return out


def scale_to_full(report: cost.Report, cfg, full, field: str = "flops") -> dict[str, float]:
    """Per-component `field` of the full model from the traced layers (module docstring)."""
    counts, out = layer_counts(full), {}
    for kind, comps in per_layer(report, cfg, field).items():
        for comp, v in comps.items():
            out[comp] = out.get(comp, 0.0) + v * (counts[kind] if kind is not None else 1)
    return out


def ideal_full(full: config.ModelConfig, t: int) -> dict[str, float]:
    out = dict(ideal_rest(full, t))
    for kind, n in layer_counts(full).items():
        for comp, v in ideal_layer(full, kind, t).items():
            out[comp] = out.get(comp, 0.0) + n * v
    return out


def prefill(cfg, prec, graphdef, state, t: int) -> cost.Report:
    tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
    return cost.count(
        api._logits, graphdef, state, tokens, params=1, static_argnums=(0,), fresh=True
    )


def decode(cfg, prec, graphdef, state, context: int) -> cost.Report:
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, context, prec.dtype))
    tok = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    return cost.count(
        steps._chunk,
        graphdef,
        state,
        tok,
        cache,
        lengths,
        params=1,
        static_argnums=(0,),
        fresh=True,
    )


def _leaf_kind(name: str, cfg) -> LayerKind | None:
    """The layer kind of a main-stack leaf ("segments.i...."), None outside the layers."""
    parts = name.split(".")
    if parts[0] != "segments":
        return None
    return layer_plan(cfg)[int(parts[1])].kinds[0]


def active_fraction(name: str, cfg) -> float:
    """Fraction of a leaf an ideal batch-1 decode step reads: one row of the embedding, of
    `tid2eid` and of a compressor's position embedding `ape` [r, W], k / E of the experts."""
    if name.startswith("mtp."):
        return 0.0
    if name.startswith("embed") or name.endswith("tid2eid"):
        return 1.0 / cfg.vocab_size
    if name.endswith("compressor.ape"):
        return 1.0 / (4 if "indexer" in name else int(_leaf_kind(name, cfg).attn))
    if ".experts." in name:
        return cfg.experts_per_token / cfg.num_experts
    return 1.0


def decode_bytes(report: cost.Report, cfg, full) -> dict[str, dict[str, float]]:
    """Full-model bytes per leaf group: measured, active (ideal) and all weights."""
    read = report.by("weight_bytes", key=lambda r: r.leaf)
    counts = layer_counts(full)
    out: dict[str, dict[str, float]] = {}
    for name, nbytes in report.leaf_bytes.items():
        kind = _leaf_kind(name, cfg)
        times = counts[kind] if kind is not None else (0 if name.startswith("mtp.") else 1)
        group = "routed experts" if ".experts." in name else "other weights"
        g = out.setdefault(group, {"measured": 0.0, "active": 0.0, "all": 0.0})
        g["measured"] += read.get(name, 0.0) * times
        g["active"] += active_fraction(name, cfg) * nbytes * times
        g["all"] += nbytes * times
    tot = {f: sum(g[f] for g in out.values()) for f in ("measured", "active", "all")}
    return {**out, "total": tot}


# ---------------------------------------------------------------------------------------------
# Driver


def _impl(name: str):
    switch = getattr(experts, "implementation", None)
    if switch is None:
        if name != "current":
            raise ValueError("v4jax.model.experts has no implementation() switch yet")
        return contextlib.nullcontext()
    return switch(name)


def run_impl(name: str, args, full, cfg, prec, graphdef, state) -> dict:
    with _impl(name):
        pre = prefill(cfg, prec, graphdef, state, args.tokens)
        dec = decode(cfg, prec, graphdef, state, args.context)
    meas, ideal = scale_to_full(pre, cfg, full), ideal_full(full, args.tokens)
    counts = layer_counts(full)
    comps = {
        c: {"measured": meas.get(c, 0.0), "ideal": ideal.get(c, 0.0)}
        for c in ORDER
        if meas.get(c) or ideal.get(c)
    }
    for v in comps.values():
        v["ratio"] = v["measured"] / v["ideal"] if v["ideal"] else None
    total = {"measured": sum(meas.values()), "ideal": sum(ideal.values())}
    total["ratio"] = total["measured"] / total["ideal"]
    bytes_ = decode_bytes(dec, cfg, full)
    for g in bytes_.values():
        g["ratio"] = g["measured"] / g["active"] if g["active"] else None
    layers = {_kind_name(k): v for k, v in per_layer(pre, cfg).items() if k is not None}
    return {
        "prefill": {
            "components": comps,
            "per_layer_measured": layers,
            "per_layer_ideal": {_kind_name(k): ideal_layer(full, k, args.tokens) for k in counts},
            "total": total,
            "traced_flops": pre.flops,
            "weight_bytes": sum(scale_to_full(pre, cfg, full, "weight_bytes").values()),
        },
        "prefill_other_ops": scale_to_full(pre, cfg, full, "elementwise"),
        "decode": {"bytes": bytes_, "flops": scale_to_full(dec, cfg, full)},
        "notes": sorted(set(pre.notes) | set(dec.notes)),
        "goals": {
            "total": total["ratio"] <= GOALS["total"],
            "routed experts": (comps["routed experts"]["ratio"] or 0) <= GOALS["routed experts"],
            "decode bytes": bytes_["total"]["ratio"] <= GOALS["decode bytes"],
        },
    }


def print_impl(name: str, res: dict, t: int, layers: int) -> None:
    p, d = res["prefill"], res["decode"]["bytes"]
    print(f"\n== routed experts: {name} ==  prefill T={t}, batch 1, {layers} layers, TFLOP")
    print(f"{'component':16s} {'measured':>10s} {'ideal':>10s} {'meas/ideal':>10s}")
    for comp, v in [*p["components"].items(), ("TOTAL", p["total"])]:
        r = f"{v['ratio']:.3f}" if v["ratio"] is not None else "-"
        print(f"{comp:16s} {v['measured'] / 1e12:10.2f} {v['ideal'] / 1e12:10.2f} {r:>10s}")
    print(f"prefill weight bytes read: {p['weight_bytes'] / 1e9:.1f} GB")
    print(f"decode step, batch 1: weight GB read / active (all: {d['total']['all'] / 1e9:.1f})")
    for g, v in d.items():
        print(f"  {g:16s} {v['measured'] / 1e9:8.2f} / {v['active'] / 1e9:8.2f} = {v['ratio']:.3f}")
    print("goals:", ", ".join(f"{k} {'PASS' if ok else 'FAIL'}" for k, ok in res["goals"].items()))
    for n in res["notes"]:
        print("note:", n)


def check_args(ap: cli.Parser, args: argparse.Namespace) -> None:
    """Every flag before anything is traced; --out's folder is created now."""
    for flag, v in (("--tokens", args.tokens), ("--context", args.context)):
        if v < 1:
            ap.fail(f"{flag} must be >= 1, not {v}")
    cli.output_file("--out", args.out)


def main(argv=None) -> int:
    ap = cli.Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="prefill length T")
    ap.add_argument("--context", type=int, default=4096, help="decode cache max_len")
    ap.add_argument(
        "--impl", nargs="+", choices=(*IMPLS, "current"), help="routed-expert paths (default: all)"
    )
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    check_args(ap, args)
    has_switch = hasattr(experts, "implementation")
    impls = args.impl or (IMPLS if has_switch else ("current",))
    full = config.flash()
    cfg = bench_config(full)
    prec = Precision(Numerics.REFERENCE, jnp.bfloat16)
    graphdef, state = api._abstract(cfg, prec, "auto")
    results = {}
    for name in impls:
        results[name] = run_impl(name, args, full, cfg, prec, graphdef, state)
        print_impl(name, results[name], args.tokens, full.num_layers)
    if args.out:
        meta = {
            "tokens": args.tokens,
            "context": args.context,
            "traced": "flash() at full width, 4 layers: window+hash, CSA+hash, HCA, CSA",
            "scaling": "per-layer counts x Flash layers of that kind, + embedding / head once",
            "layers": layer_kinds(full),
        }
        with open(args.out, "w") as f:
            json.dump({"setup": meta, "implementations": results}, f, indent=1)
    return 0


def _kind_name(k: LayerKind) -> str:
    return f"{k.attn.name}{'+hash' if k.hash_routed else ''}"


def layer_kinds(full) -> dict[str, int]:
    return {_kind_name(k): n for k, n in layer_counts(full).items()}


if __name__ == "__main__":
    sys.exit(main())
