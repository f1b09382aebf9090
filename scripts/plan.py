"""Memory plan of a full-size model on a mesh, compiled ahead of time on fake CPU devices.

    .venv/bin/python scripts/plan.py --model flash --mesh 'expert=8' --context 131072 --hbm-gb 141

Lowers and compiles the sharded forward (`v4jax.api.logits_jit`, the program `Model.logits`
runs) for abstract parameters (ShapeDtypeStructs with their NamedShardings: nothing is
allocated) and prints, per device: parameter bytes (from the rules), the compiled program's
argument and temporary bytes (`compiled.memory_analysis()`), a KV-cache estimate at the context
length (the reference's cache layout: CSA 320 B and HCA 8 B per token per layer in bf16, plus
each layer's 128-slot window and compressor state), and whether it fits. Only the forward
(prefill) program is compiled; the decode step's own temporaries are not planned here (its
cache is the KV estimate above). Temporaries are those of the CPU compiler for a short prefill
(`--batch` x `--seq`); a GPU compile schedules differently, so treat them as an estimate.

    .venv/bin/python scripts/plan.py --train --model flash --mesh 'fsdp=8 x expert=8' \
        --batch 8 --seq 4096 --remat block --hbm-gb 80 --json plan.json

`--train` (issue 11 §5) compiles the whole train step instead (`v4jax.train.make_step`: forward,
backward, optimizer, router-bias update; tokens [--accum, --batch, --seq]) for an abstract state:
float32 masters placed by the TRAIN rules, optimizer moments sharded like their parameters
(ZeRO). It prints per-device bytes of params, gradients (sharded as the params), optimizer
state and frozen leaves, the compiled memory analysis (temporaries: activations and gradients
in flight), collective bytes per step (`sharding.train_plan`) both as the SPMD partitioner
emits them (the dtypes a GPU / TPU program keeps) and as XLA:CPU runs them (its float
normalization makes every bf16 collective float32), and the verdict, "DOES NOT FIT: X GB
over" when it does not.
Flags are checked before jax sets up devices or anything is compiled: a bad one is one
`error: ...` line, exit status 2.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
import time

from v4jax import cli  # imports jax but sets up no device (see _fake_devices)


def _parser() -> cli.Parser:
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("flash", "pro", "small", "tiny"), default="flash")
    p.add_argument("--mesh", default="expert=8", help="e.g. 'expert=8', 'data=2 x expert=8'")
    p.add_argument("--rules", choices=("decode", "train"), help="default: train with --train")
    p.add_argument("--numerics", choices=("reference", "bf16"), default="reference")
    p.add_argument("--context", type=int, default=131072, help="tokens per sequence (KV cache)")
    p.add_argument("--batch", type=int, default=1, help="sequences (compiled batch and cache)")
    p.add_argument("--seq", type=int, default=128, help="tokens of the compiled forward")
    p.add_argument("--hbm-gb", type=float, default=141.0, help="memory per device, GB (1e9 B)")
    p.add_argument("--reserve", type=float, default=0.08, help="fraction of HBM kept free")
    t = p.add_argument_group("training step (--train)")
    t.add_argument("--train", action="store_true", help="plan the whole train step instead")
    t.add_argument("--optimizer", choices=("muon", "adamw"), help="default muon")
    t.add_argument(
        "--remat", help="none | block | tensors | save:NAME,... | offload[:NAME,...] (default none)"
    )
    t.add_argument("--accum", type=int, help="micro-batches per step (default 1)")
    t.add_argument(
        "--moe-buffer",
        type=float,
        help="expert-parallel receive buffer = this x a balanced load (default: dropless)",
    )
    t.add_argument("--json", help="write the plan's numbers to this file")
    t.add_argument(
        "--layers",
        type=int,
        help="plan only the first N layers (and the MTP block): a quicker, reduced-depth "
        "compile for finding what sets the peak (default: all)",
    )
    return p


def check_flags(ap: cli.Parser, a: argparse.Namespace) -> dict[str, int]:
    """Every flag, before any device exists; returns the mesh axis sizes."""
    from sharding.mesh import parse_mesh_spec  # imports jax; its devices are set up later

    for flag, value in (("--context", a.context), ("--batch", a.batch), ("--seq", a.seq)):
        if value < 1:
            ap.fail(f"{flag} must be >= 1, not {value}")
    if not a.hbm_gb > 0:
        ap.fail(f"--hbm-gb must be > 0, not {a.hbm_gb}")
    if not 0 <= a.reserve < 1:
        ap.fail(f"--reserve must be in [0, 1), not {a.reserve}")
    _check_train_flags(ap, a)
    try:
        return parse_mesh_spec(a.mesh)
    except ValueError as e:
        ap.fail(f"--mesh: {e}")


def _check_train_flags(ap: cli.Parser, a: argparse.Namespace) -> None:
    """The --train flags: refused without --train, checked and defaulted with it."""
    given = [f for f in ("optimizer", "remat", "accum", "moe_buffer", "json", "layers")]
    given = [f for f in given if getattr(a, f) is not None]
    if not a.train:
        if given:
            ap.fail(f"--{given[0].replace('_', '-')} plans a training step: add --train")
        a.rules = a.rules or "decode"
        return
    from v4jax.model import remat as remat_policy

    a.rules = a.rules or "train"
    a.optimizer = a.optimizer or "muon"
    a.remat = a.remat or "none"
    a.accum = 1 if a.accum is None else a.accum
    try:
        remat_policy.check(a.remat)
    except ValueError as e:
        ap.fail(f"--remat: {e}")
    if a.accum < 1:
        ap.fail(f"--accum must be >= 1, not {a.accum}")
    if a.moe_buffer is not None and not a.moe_buffer >= 1:
        ap.fail(f"--moe-buffer must be >= 1 (a balanced load), not {a.moe_buffer}")
    if a.seq < 2:
        ap.fail(f"--seq must be >= 2 with --train (next-token targets), not {a.seq}")
    if a.layers is not None:
        import v4jax

        full = getattr(v4jax.config, a.model)().num_layers
        if not 1 <= a.layers <= full:
            ap.fail(f"--layers must be in [1, {full}] for {a.model}, not {a.layers}")
    if a.json is not None:
        folder = os.path.dirname(os.path.abspath(a.json))
        if not os.path.isdir(folder):
            ap.fail(f"--json: folder {folder} does not exist")


def _fake_devices(n: int) -> None:
    """`n` fake CPU devices: before the first use of jax's devices (jax may be imported)."""
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # read at import: set it on jax's config too
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def kv_cache_bytes(cfg, context: int) -> int:
    """Bytes of one sequence's decode cache at `context` tokens (the reference's layout, bf16)."""
    k, ik = cfg.head_dim, cfg.index_head_dim
    total = 0
    for r in cfg.layer_ratios:
        total += cfg.window_size * k * 2  # ring buffer, every layer
        if r == 4:  # CSA: entries (320 B/token at Flash widths) + both compressor states
            total += context // 4 * (k + ik) * 2
            total += 2 * (2 * 4) * (2 * k) * 4 + 2 * (2 * 4) * (2 * ik) * 4
        elif r == 128:  # HCA: entries (8 B/token) + compressor state
            total += context // 128 * k * 2 + 2 * 128 * k * 4
    return total


_UPCAST = re.compile(
    r"^\s*%\S+ = (\w+)\[([\d,]*)\]\S* fusion\((%param[.\d]*)\), kind=kLoop, "
    r"calls=%wrapped_convert"
)
_PARAM = re.compile(r"^\s*(%param[.\d]*) = (\w+)\[")
_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "s8": 1, "u8": 1}


def cpu_upcast_bytes(hlo_text: str) -> int:
    """Bytes of whole-parameter converts from FP8 / E8M0 in the compiled entry computation.

    The CPU compiler has no FP8 / E8M0 storage support: its float normalisation upcasts every
    stacked FP8 weight (to f16) and E8M0 scale (to f32) as a whole before the layer loop
    slices it, which a GPU / TPU compile keeps in the storage type. Counted separately.
    """
    entry = hlo_text[hlo_text.index("\nENTRY") :].splitlines()
    dtypes = {m.group(1): m.group(2) for line in entry if (m := _PARAM.match(line))}
    total = 0
    for line in entry:
        if (m := _UPCAST.match(line)) and dtypes.get(m.group(3), "").startswith("f8"):
            dims = [int(d) for d in m.group(2).split(",") if d]
            total += math.prod(dims) * _BYTES.get(m.group(1), 4)
    return total


def abstract_train_state(cfg, mesh, rules, optimizer: str = "muon"):
    """(TrainModel, abstract TrainState with NamedShardings, optimizer): float32 masters placed
    as `trainable` places them (each with its release weight's PartitionSpec under `rules`),
    optimizer moments sharded like their parameters (ZeRO), scalars replicated. No memory."""
    import jax

    import sharding
    from sharding.train_plan import like_params
    from v4jax.api import Model, _abstract, _precision
    from v4jax.train import init_state, make_optimizer, trainable
    from v4jax.train.schedule import LRSchedule

    prec = _precision("reference", None)  # release formats; the train forward runs in bf16
    graphdef, release = _abstract(cfg, prec, "auto")
    specs = sharding.param_specs(release, mesh, rules)
    tm = jax.eval_shape(lambda st: trainable(Model(cfg, prec, graphdef, st, "auto")), release)
    sched = LRSchedule(peak=2.7e-4, warmup=1, decay_start=1, total=2)  # values: no bytes
    opt = make_optimizer(tm.params, schedule=sched, kind=optimizer)
    state = jax.eval_shape(lambda t: init_state(t, opt, copy=False), tm)
    shardings = like_params(state, specs, mesh)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
    )
    return tm.replace(mesh=mesh, rules=rules), state, (opt, sched)


def plan_train(
    cfg,
    mesh,
    rules,
    *,
    batch: int,
    seq: int,
    accum: int = 1,
    optimizer: str = "muon",
    remat: str = "none",
    moe_buffer: float | None = None,
) -> dict:
    """Lowers and compiles the whole train step (`make_step`: forward, backward, optimizer,
    router-bias update) for tokens [accum, batch, seq] on `mesh`, the expert-parallel receive
    buffer bounded at `moe_buffer` x a balanced load (None: dropless); returns its numbers."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    import sharding
    from sharding.train_plan import collective_bytes, partitioned_hlo, tree_bytes
    from v4jax.numerics.policy import jit
    from v4jax.train import LossWeights, make_step

    mesh, rules = sharding.auto(mesh), sharding.rules_for(rules)
    tm, state, (opt, sched) = abstract_train_state(cfg, mesh, rules, optimizer)
    # make_step's program without its host-side placement: traced under the mesh's rules here
    state_sh = jax.tree.map(lambda a: a.sharding, state)
    bare = tm.replace(mesh=None, rules=None, moe_buffer=moe_buffer)
    inner = make_step(bare, opt, sched, LossWeights(), remat=remat, shardings=state_sh)

    raw = inner.__wrapped__  # the step itself: jitted here with this plan's shardings

    def step(state, tokens, mask):
        with sharding.use_rules(mesh, rules):
            return raw(state, tokens, mask)

    shape = (accum, batch, seq)
    spec = sharding.resolve((None, "batch", "length"), shape, dict(mesh.shape), rules.activations)
    tok = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=NamedSharding(mesh, spec))
    fn = jit(
        step,
        in_shardings=(state_sh, tok.sharding, tok.sharding),
        out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    t0 = time.perf_counter()
    lowered = fn.lower(state, tok, tok)
    t1 = time.perf_counter()
    partitioned, compiled = partitioned_hlo(lowered)
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()
    coll, loops = collective_bytes(compiled.as_text())
    coll_partitioned, _ = collective_bytes(partitioned)
    params, opt_b = tree_bytes(state.params), tree_bytes(state.opt_state)
    frozen = tree_bytes((state.frozen, state.step, state.rng))
    mem = {
        k: int(getattr(ma, f"{k}_size_in_bytes"))
        for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    return dict(
        mesh=dict(mesh.shape),
        rules=rules.name,
        tokens=list(shape),
        optimizer=optimizer,
        remat=remat,
        moe_buffer=moe_buffer,
        lower_s=t1 - t0,
        compile_s=t2 - t1,
        params=vars(params),
        grads=vars(params),
        opt_state=vars(opt_b),
        frozen=vars(frozen),
        memory=mem,
        need=mem["argument"] + mem["output"] - mem["alias"] + mem["temp"],
        collectives=coll,
        collectives_partitioned=coll_partitioned,
        while_loops=[list(x) for x in loops],
    )


def first_layers(cfg, n: int):
    """`cfg` cut to its first `n` layers (hash-routed ones included), the MTP block kept."""
    ratios = cfg.layer_ratios[:n] + cfg.mtp_ratios
    return cfg.replace(
        num_layers=n, num_hash_layers=min(n, cfg.num_hash_layers), compress_ratios=ratios
    )


def _main_train(a: argparse.Namespace) -> int:
    import json

    import sharding
    import v4jax
    from sharding.train_plan import verdict

    cfg = getattr(v4jax.config, a.model)()
    if a.layers is not None:
        cfg = first_layers(cfg, a.layers)
    mesh = sharding.make_mesh(a.mesh)
    r = plan_train(
        cfg,
        mesh,
        a.rules,
        batch=a.batch,
        seq=a.seq,
        accum=a.accum,
        optimizer=a.optimizer,
        remat=a.remat,
        moe_buffer=a.moe_buffer,
    )
    fits, over = verdict(r["need"], a.hbm_gb * 1e9, a.reserve)
    r.update(
        model=a.model,
        layers=cfg.num_layers,
        hbm_gb=a.hbm_gb,
        reserve=a.reserve,
        fits=fits,
        over=over,
    )
    gb = lambda n: f"{n / 1e9:9.2f} GB"
    pd = lambda k: f"{k:<26}{gb(r[k]['per_device'])}  (total {gb(r[k]['total']).strip()})"
    m = r["memory"]
    depth = "" if a.layers is None else f" (first {cfg.num_layers} layers only)"
    print(f"model {a.model}{depth}  mesh {r['mesh']}  rules {r['rules']}  optimizer {a.optimizer}")
    print(f"compiled train step: tokens {r['tokens']} (micro-batches, batch, seq), remat {a.remat}")
    buf = "dropless" if a.moe_buffer is None else f"{a.moe_buffer:g} x a balanced load"
    print(f"expert-parallel receive buffer: {buf}")
    print(f"lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s")
    print("per device:")
    for k in ("params", "grads", "opt_state", "frozen"):
        print("  " + pd(k))
    print(f"  compiled arguments        {gb(m['argument'])}")
    print(f"  compiled outputs          {gb(m['output'])}  (aliased {gb(m['alias']).strip()})")
    print(f"  temporaries               {gb(m['temp'])}  (activations + gradients in flight)")
    print(f"  need (arg + out - alias + temp) {gb(r['need']).strip()} of {gb(a.hbm_gb * 1e9)}")
    print("collectives per step per device (while bodies x trip count):")
    print(f"  {'':<24}{'as partitioned':>14}{'XLA:CPU runs':>15}  (CPU: bf16 collectives in f32)")
    for k, v in r["collectives"].items():
        print(f"  {k:<24}{gb(r['collectives_partitioned'][k]):>14}{gb(v):>15}")
    trips = collections.Counter(t for _, t in r["while_loops"])
    print(f"  while loops by trip count: {dict(sorted(trips.items()))} (-1: unknown, counted once)")
    budget = a.hbm_gb * 1e9 * (1 - a.reserve)
    tail = f"(budget {gb(budget).strip()}: {a.reserve:.0%} of HBM kept free)"
    if fits:
        print(f"verdict: FITS {tail}")
    else:
        print(f"verdict: DOES NOT FIT: {over / 1e9:.2f} GB ({over / 2**30:.2f} GiB) over {tail}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    sizes = check_flags(ap, a)
    _fake_devices(math.prod(sizes.values()))
    if a.train:
        return _main_train(a)
    import jax
    import jax.numpy as jnp

    import sharding
    import v4jax
    from v4jax.api import _abstract, _precision, logits_jit

    cfg = getattr(v4jax.config, a.model)()
    mesh = sharding.make_mesh(a.mesh)
    rules = sharding.rules_for(a.rules)
    prec = _precision(a.numerics, None)
    graphdef, abstract = _abstract(cfg, prec, "auto")
    pb = sharding.param_bytes(abstract, mesh, rules)
    fn, tok = logits_jit(graphdef, abstract, mesh, rules, (a.batch, a.seq), cfg.vocab_size)
    t0 = time.perf_counter()
    lowered = fn.lower(
        sharding.abstract_state(abstract, mesh, rules),
        jax.ShapeDtypeStruct((a.batch, a.seq), jnp.int32, sharding=tok),
    )
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()

    data_ways = math.prod(mesh.shape.get(x, 1) for x in rules.activations["batch"])
    seqs_per_device = -(-a.batch // data_ways)
    kv_seq = kv_cache_bytes(cfg, a.context)
    kv = kv_seq * seqs_per_device  # one KV head: replicated over tensor / expert ranks
    upcast = cpu_upcast_bytes(compiled.as_text())
    need_cpu = pb.per_device + ma.temp_size_in_bytes + kv
    need = need_cpu - upcast
    budget = a.hbm_gb * 1e9 * (1 - a.reserve)
    gb = lambda n: f"{n / 1e9:8.2f} GB"
    print(f"model {a.model}  mesh {dict(mesh.shape)}  rules {rules.name}  numerics {a.numerics}")
    print(f"compiled forward (prefill): batch {a.batch} x {a.seq} tokens; decode step not compiled")
    print(f"lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s")
    print(f"parameters total        {gb(pb.total)}")
    print(f"parameters per device   {gb(pb.per_device)}  ({pb.per_device / pb.total:.4f} of total)")
    print(f"  compiled arguments    {gb(ma.argument_size_in_bytes)}")
    print(f"  unsplit leaves >= 1MB {len(pb.replicated)} ({gb(sum(b for _, b in pb.replicated))})")
    print(f"temporaries per device  {gb(ma.temp_size_in_bytes)}  (CPU compile)")
    print(f"  CPU-only upcasts      {gb(upcast)}  (whole FP8 / E8M0 stacks; see cpu_upcast_bytes)")
    print(f"outputs per device      {gb(ma.output_size_in_bytes)}")
    print(f"KV cache per sequence   {gb(kv_seq)} at {a.context} tokens")
    print(f"KV cache per device     {gb(kv)} ({seqs_per_device} sequence(s))")
    print(f"total per device        {gb(need)} of {gb(a.hbm_gb * 1e9)} HBM (without upcasts)")
    print(f"  as compiled for CPU   {gb(need_cpu)}")
    fits = lambda n: "FITS" if n <= budget else "DOES NOT FIT"
    print(f"verdict: {fits(need)} (budget {gb(budget)}: {a.reserve:.0%} of HBM kept free)")
    print(f"  counting the CPU-only upcasts: {fits(need_cpu)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
