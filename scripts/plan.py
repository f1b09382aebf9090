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
Flags are checked before jax sets up devices or anything is compiled: a bad one is one
`error: ...` line, exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

from v4jax import cli  # imports jax but sets up no device (see _fake_devices)


def _parser() -> cli.Parser:
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("flash", "pro"), default="flash")
    p.add_argument("--mesh", default="expert=8", help="e.g. 'expert=8', 'data=2 x expert=8'")
    p.add_argument("--rules", choices=("decode", "train"), default="decode")
    p.add_argument("--numerics", choices=("reference", "bf16"), default="reference")
    p.add_argument("--context", type=int, default=131072, help="tokens per sequence (KV cache)")
    p.add_argument("--batch", type=int, default=1, help="sequences (compiled batch and cache)")
    p.add_argument("--seq", type=int, default=128, help="tokens of the compiled forward")
    p.add_argument("--hbm-gb", type=float, default=141.0, help="memory per device, GB (1e9 B)")
    p.add_argument("--reserve", type=float, default=0.08, help="fraction of HBM kept free")
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
    try:
        return parse_mesh_spec(a.mesh)
    except ValueError as e:
        ap.fail(f"--mesh: {e}")


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


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    sizes = check_flags(ap, a)
    _fake_devices(math.prod(sizes.values()))
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
