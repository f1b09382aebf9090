"""Train-step cost on CPU per rematerialisation policy: compile time, step time, tokens/s,
memory, and training FLOPs per token against the ideal (issue 12; policies:
V4 report §3.5).

Why: remat trades memory for recomputation, and the trade is only visible when both are
measured on the real step (`v4jax.train.step.make_step`: forward + backward of the whole
objective, LM + MTP + balance terms, then the optimizer). XLA's `cost_analysis` counts a scan
body once, and V4 scans over layers, so FLOPs are counted on the step's jaxpr
(`v4jax.cost`: scans times their length), per component.

* Time: the step compiled ahead of time (trace and compile timed apart), one warm-up call,
  then the median of `--steps` calls (`block_until_ready` on the returned, donated state).
* Memory: `memory_analysis()` of the compiled step (argument, output, temp and alias bytes;
  peak estimate = arguments + outputs + temp - alias), and the process peak RSS
  (`getrusage` ru_maxrss) of a subprocess that runs only that policy: `rss_base` after the
  model and optimizer state are built, `rss_peak` after the timed steps (compiler included).
* FLOPs: matmul FLOPs of the step, split into the model (the gradient-accumulation scan:
  forward + backward) and the optimizer (the rest; Muon's Newton-Schulz, checked against a
  hand count over the Muon matrices). Ideal = 3 x the forward ideal of `bench_flops`
  (`ideal_layer`, `ideal_rest`; i.e. 6 x the matmul parameters each token touches + 3 x the
  attention core) for the main layers on S tokens and the MTP block on S - 1 (its layer, the
  shared head again, and its e_proj / h_proj, the only matmuls counted under norms/residual;
  h_proj runs on each of the hc_mult streams). The indexer and its scores get no gradient at
  indexer weight 0 (top-k is discrete): forward only, x 1. Block remat recomputes each block's
  forward: about +1/3 of the blocks' FLOPs (less in total: the head and the MTP projections
  are outside the blocks). Known excess over the ideal: the CPU "tiles" routed-expert path
  skips unused tiles with a `lax.cond`, which `v4jax.cost` counts as taken (the static bound
  of tiles); the indexer multiplies by a Hadamard matrix; the attention core attends over its
  whole index list.

On a 2-core CPU the compile dominates (minutes per policy); at the tiny size Muon's
Newton-Schulz (~50 GFLOP per step, whatever the batch) outweighs the model's forward +
backward, so `--optimizer adamw` shows the policies' differences in step time more clearly.

Usage: python scripts/bench_train.py [--preset tiny|small] [--batch 2] [--seq-len 64]
       [--steps 5] [--policies none block tensors] [--optimizer muon] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

PRESETS = ("tiny", "small")
MARK = "BENCH_TRAIN_JSON "  # prefix of the worker's result line
REMAT_CALLS = ("remat", "remat2", "checkpoint")
REMAT_SCOPE = "rematted_computation"  # JAX's name scope around a recomputed forward
FORWARD_ONLY = ("indexer", "indexer scores")  # no gradient at indexer weight 0


def _args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)}")
    ap.add_argument("--batch", type=int, default=2, help="rows per step")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per row")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    ap.add_argument("--policies", nargs="+", default=["none", "block", "tensors"])
    ap.add_argument("--optimizer", default="muon", help="muon (V4) or adamw")
    ap.add_argument("--json", default="runs/bench_train.json", help="results file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one policy
    return ap.parse_args(argv)


def _check(a) -> None:
    """Everything that can be refused before a model is built."""
    from v4jax import config
    from v4jax.model import remat as remat_policy

    if a.preset not in PRESETS:
        raise ValueError(f"--preset {a.preset!r}: expected one of {', '.join(PRESETS)}")
    for name in ("batch", "steps"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(a, name)}")
    limit = getattr(config, a.preset)().max_position_embeddings
    if not 3 <= a.seq_len <= limit:
        raise ValueError(f"--seq-len must be in [3, {limit}] (MTP needs 3), got {a.seq_len}")
    if a.optimizer not in ("muon", "adamw"):
        raise ValueError(f"--optimizer {a.optimizer!r}: expected muon or adamw")
    for p in a.policies:
        remat_policy.check(p)
    if len(set(a.policies)) != len(a.policies):
        raise ValueError(f"--policies {' '.join(a.policies)}: a policy is repeated")
    if os.path.isdir(a.json):
        raise ValueError(f"--json {a.json}: is a directory")


# ---------------------------------------------------------------------------------------------
# Ideal FLOPs (pure arithmetic on the config)


def ideal(cfg, batch: int, seq: int) -> dict[str, dict[str, float]]:
    """Per-component ideal FLOPs of one step: "forward" and "train" (fwd + bwd, module doc)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_flops import ideal_layer, ideal_rest

    from v4jax.config import LayerKind

    fwd: dict[str, float] = {}

    def add(part: dict[str, float], rows: int = batch) -> None:
        for comp, v in part.items():
            fwd[comp] = fwd.get(comp, 0.0) + rows * v

    for i in range(cfg.num_layers):
        add(ideal_layer(cfg, cfg.layer_kind(i), seq))
    add(ideal_rest(cfg, seq))
    if cfg.num_mtp_layers:  # the MTP block on positions 0 .. S-2
        add(ideal_layer(cfg, LayerKind(cfg.mtp_ratios[0], False), seq - 1))
        add(ideal_rest(cfg, seq - 1))
        add({"norms/residual": 2.0 * (seq - 1) * cfg.dim**2 * (1 + cfg.hc_mult)})
    train = {c: v * (1 if c in FORWARD_ONLY else 3) for c, v in fwd.items()}
    return {"forward": fwd, "train": train}


def newton_schulz_flops(params, coeffs_rows: int) -> float:
    """Hand count of Muon's Newton-Schulz per step: per matrix [.., m, n] (m <= n) and row,
    X X^T (2 m^2 n), G G (2 m^3), (..) X (2 m^2 n)."""
    import jax

    from v4jax.train import optim

    total = 0.0
    labels = jax.tree.leaves(optim.partition(params))
    for p, lab in zip(jax.tree.leaves(params), labels, strict=True):
        if lab == optim.MUON:
            m, n = sorted(p.shape[-2:])
            total += math.prod(p.shape[:-2]) * coeffs_rows * (4 * m * m * n + 2 * m**3)
    return total


# ---------------------------------------------------------------------------------------------
# One policy (run in its own process so its peak RSS is its own)


def classify(eqn):
    """`cost.v4_component`, except that a remat call does not impose its call site's component
    on the recomputed forward, and JAX's `rematted_computation` scope is not a component."""
    from v4jax import cost

    if eqn.primitive.name in REMAT_CALLS:
        return None
    comp = cost.v4_component(eqn)
    if comp == REMAT_SCOPE:
        import dataclasses

        info = eqn.source_info
        kept = tuple(s for s in info.name_stack.stack if getattr(s, "name", "") != REMAT_SCOPE)
        stack = dataclasses.replace(info.name_stack, stack=kept)
        comp = cost.v4_component(eqn.replace(source_info=info.replace(name_stack=stack)))
    return comp


def count_flops(jaxpr, accum: int) -> dict:
    """Matmul FLOPs of the step's jaxpr: the model (the gradient-accumulation scan, `accum`
    trips) per component, and the rest (the optimizer)."""
    from v4jax import cost

    rep = cost.count_jaxpr(jaxpr, [None] * len(jaxpr.invars), classify=classify)
    top = [i for i, lp in rep.loops.items() if lp.parent is None and lp.kind == "scan"]
    top = [i for i in top if rep.loops[i].trips == accum]
    if not top:
        raise RuntimeError("no gradient-accumulation scan found in the step's jaxpr")
    inside = lambda r: bool(r.loops) and r.loops[0] == top[0]  # noqa: E731
    model = rep.by("flops", key=lambda r: r.component if inside(r) else None)
    optimizer = model.pop(None, 0.0)
    return {
        "model": model,
        "optimizer": optimizer,
        "elementwise": rep.elementwise,
        "notes": list(rep.notes),
    }


def _build(a, policy):
    import jax
    import jax.numpy as jnp

    import v4jax
    from v4jax.train import model as tmodel
    from v4jax.train import optim
    from v4jax.train.schedule import LRSchedule
    from v4jax.train.step import init_state, make_step

    cfg = getattr(v4jax.config, a.preset)()
    tm = tmodel.trainable(v4jax.init(cfg, seed=0, numerics="bf16", dtype=jnp.float32))
    total = a.steps + 2
    sched = LRSchedule(peak=1e-3, warmup=1, decay_start=total - 1, total=total)
    opt = optim.make_optimizer(tm.params, schedule=sched, kind=a.optimizer)
    ns = newton_schulz_flops(tm.params, len(optim.OptimConfig().muon_ns_coeffs))
    ns = ns if a.optimizer == "muon" else 0.0
    state = init_state(tm, opt, copy=False)
    step = make_step(tm, opt, sched, remat=policy)
    key = jax.random.key(1)
    tokens = jax.random.randint(key, (1, a.batch, a.seq_len), 0, cfg.vocab_size, jnp.int32)
    mask = jnp.ones(tokens.shape, jnp.int32)
    return step, state, tokens, mask, ns


def measure(a, policy: str) -> dict:
    import resource

    import jax

    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731 (KiB)
    step, state, tokens, mask, ns = _build(a, policy)
    out: dict = {"rss_base": rss(), "newton_schulz_hand": ns}
    t0 = time.perf_counter()
    traced = step.trace(state, tokens, mask)
    t1 = time.perf_counter()
    compiled = traced.lower().compile()
    out.update(trace_s=t1 - t0, compile_s=time.perf_counter() - t1)  # compile: lower + XLA
    mem = compiled.memory_analysis()
    out["memory"] = {
        k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")
    }
    m = out["memory"]
    m["peak_estimate"] = m["argument"] + m["output"] + m["temp"] - m["alias"]
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, list | tuple) else xla
    out["xla_flops"] = float(xla.get("flops", float("nan")))
    state, metrics = compiled(state, tokens, mask)  # warm-up
    jax.block_until_ready(state)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, tokens, mask)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    out.update(step_s=times, step_median_s=statistics.median(times), rss_peak=rss())
    out["loss"] = float(metrics["loss"])
    out["flops"] = count_flops(traced.jaxpr, tokens.shape[0])
    return out


# ---------------------------------------------------------------------------------------------
# Driver


def _run_worker(argv: list[str], policy: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", policy]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(
            f"policy {policy}: worker failed ({proc.returncode}): {' | '.join(tail)}"
        )
    return json.loads(lines[-1][len(MARK) :])


def summarize(res: dict, ideal_train: dict, tokens: int) -> None:
    """Adds per-token numbers and ratios to one policy's result, in place."""
    model = res["flops"]["model"]
    total = sum(model.values())
    res["tokens_per_s"] = tokens / res["step_median_s"]
    res["model_flops_per_token"] = total / tokens
    res["model_over_ideal"] = total / sum(ideal_train.values())
    res["ratios"] = {c: model.get(c, 0.0) / v for c, v in ideal_train.items() if v}
    opt, hand = res["flops"]["optimizer"], res["newton_schulz_hand"]
    res["optimizer_over_hand"] = opt / hand if hand else None
    res["achieved_gflops"] = (total + opt) / res["step_median_s"] / 1e9


def print_times(setup: dict, results: dict) -> None:
    mb = lambda b: f"{b / 2**20:9.1f}"  # noqa: E731
    print(
        f"\n== {setup['preset']}: {setup['batch']} x {setup['seq_len']} tokens per step, "
        f"{setup['optimizer']}, CPU ({setup['cpu_count']} cores, shared: timings under contention)"
    )
    print(
        f"{'policy':9s} {'trace_s':>7s} {'compile_s':>9s} {'step_ms':>8s} {'tok/s':>8s} "
        f"{'temp_MiB':>9s} {'peak_MiB':>9s} {'rss_MiB':>9s} {'GFLOP/s':>8s}"
    )
    for p, r in results.items():
        print(
            f"{p:9s} {r['trace_s']:7.1f} {r['compile_s']:9.1f} {r['step_median_s'] * 1e3:8.1f} "
            f"{r['tokens_per_s']:8.1f} {mb(r['memory']['temp'])} "
            f"{mb(r['memory']['peak_estimate'])} {mb(r['rss_peak'])} {r['achieved_gflops']:8.2f}"
        )
    print(
        "temp, peak: memory_analysis of the compiled step (peak = args + outputs + temp - "
        "alias); rss: peak RSS of the policy's own process (compiler included)"
    )


def print_flops(setup: dict, ideal_train: dict, results: dict) -> None:
    t = setup["tokens_per_step"]
    print("\ntraining matmul MFLOP per token, measured (measured / ideal); ideal = 3 x forward")
    print(f"{'component':16s} {'ideal':>9s}" + "".join(f" {p:>15s}" for p in results))
    rows = [c for c in ideal_train if ideal_train[c]]
    rows += sorted({c for r in results.values() for c in r["flops"]["model"]} - set(rows))
    for c in rows:
        cells = ""
        for r in results.values():
            v, ratio = r["flops"]["model"].get(c, 0.0) / t / 1e6, r["ratios"].get(c)
            cells += f" {v:8.2f} ({ratio:4.2f})" if ratio is not None else f" {v:8.2f} (  - )"
        print(f"{c:16s} {ideal_train.get(c, 0.0) / t / 1e6:9.2f}{cells}")
    cells = "".join(
        f" {r['model_flops_per_token'] / 1e6:8.2f} ({r['model_over_ideal']:4.2f})"
        for r in results.values()
    )
    print(f"{'TOTAL model':16s} {sum(ideal_train.values()) / t / 1e6:9.2f}{cells}")
    print(
        "6 x active params (count_params: no MTP, no attention core): "
        f"{6 * setup['active_params'] / 1e6:.2f} MFLOP/token"
    )
    base = results.get("none")
    for p, r in results.items():
        extra = ""
        if base and p != "none":
            extra = (
                f", model FLOPs vs none {r['model_over_ideal'] / base['model_over_ideal'] - 1:+.1%}"
            )
        hand = r["optimizer_over_hand"]
        hand = f"x{hand:.3f} the Newton-Schulz hand count" if hand else "no Muon"
        print(
            f"{p}: optimizer {r['flops']['optimizer'] / 1e9:.2f} GFLOP/step ({hand}), "
            f"XLA cost_analysis {r['xla_flops'] / 1e9:.2f} GFLOP/step (loop bodies once), "
            f"loss {r['loss']:.3f}{extra}"
        )
    for n in sorted({n for r in results.values() for n in r["flops"]["notes"]}):
        print("note:", n)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _args(argv)
    _check(a)
    if a.worker:
        print(MARK + json.dumps(measure(a, a.worker)), flush=True)
        return 0
    import v4jax

    cfg = getattr(v4jax.config, a.preset)()
    tokens = a.batch * a.seq_len
    ideal_ = ideal(cfg, a.batch, a.seq_len)
    setup = dict(
        preset=a.preset,
        batch=a.batch,
        seq_len=a.seq_len,
        steps=a.steps,
        optimizer=a.optimizer,
        tokens_per_step=tokens,
        cpu_count=os.cpu_count(),
        active_params=v4jax.count_params(cfg)["active"],
    )
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    results = {}
    for p in a.policies:
        print(f"measuring remat={p} (a fresh process: trace, compile, steps) ...", flush=True)
        results[p] = _run_worker(argv, p)
        summarize(results[p], ideal_["train"], tokens)
        with open(a.json, "w") as f:  # after each policy, so a long run keeps what it measured
            json.dump({"setup": setup, "ideal": ideal_, "policies": results}, f, indent=1)
    print_times(setup, results)
    print_flops(setup, ideal_["train"], results)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
