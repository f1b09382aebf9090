"""Muon under ZeRO: collective bytes of one optimizer update, per layout, from compiled HLO.

    .venv/bin/python scripts/bench_muon_zero.py --model flash --mesh 'fsdp=8 x expert=8'

Compiles only the V4 optimizer's update (clip, Muon 8+2 Newton-Schulz + AdamW, decay, -lr) for
an abstract ZeRO-sharded state (`scripts/plan.py`'s: float32 masters placed by the TRAIN rules,
moments like their parameters, gradients too) on fake CPU devices, once per
`OptimConfig.muon_layout`:

- owner: hybrid ZeRO (V4 report §3.5.1, `sharding.constraints.per_matrix`): each device pads
  the stack of matrices in its own block (layers, experts) and all-to-alls it over each mesh
  axis on a matrix dim, so it holds whole matrices, about 1/n of the leaf's, and
  orthogonalises those; the results go back the same way (a device with too few matrices to
  spread gathers them in that axis's group instead).
- replicated: the naive gather-all: every device gathers and orthogonalises every matrix.
- sharded: GSPMD runs Newton-Schulz's matmuls on the ZeRO shards (collectives in every one of
  the 10 steps).

For each it prints the per-device bytes of each collective kind (`sharding.train_plan`, while
loops counted by trip count) and the Muon matrices' bytes: total and one device's ZeRO share,
the floors of "replicated" (receive all but one's share) and "owner" (about two shares) ; JSON
with --json. Values are the same for the three layouts (tests/test_train_mesh.py); only where
the work runs differs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys
import time

from v4jax import cli

HERE = pathlib.Path(__file__).resolve().parent
LAYOUTS = ("owner", "replicated", "sharded")


def _plan():
    spec = importlib.util.spec_from_file_location("cli_plan", HERE / "plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _parser() -> cli.Parser:
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("flash", "pro", "small", "tiny"), default="tiny")
    p.add_argument("--mesh", default="fsdp=4 x expert=2")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated")
    p.add_argument("--json", help="write the numbers to this file")
    p.add_argument("--hlo", help="write each layout's compiled HLO to this folder")
    return p


def measure(cfg, mesh, layout: str, hlo_dir: pathlib.Path | None = None) -> dict:
    """Collective bytes of the optimizer update's compiled program with `layout`."""
    import jax

    import sharding
    from sharding.train_plan import collective_bytes
    from v4jax.numerics.policy import jit
    from v4jax.train import make_optimizer
    from v4jax.train.optim import OptimConfig, partition, spec_table

    plan = _plan()
    _, state, (_, sched) = plan.abstract_train_state(cfg, mesh, sharding.TRAIN, "muon")
    opt = make_optimizer(state.params, schedule=sched, config=OptimConfig(muon_layout=layout))
    shard = jax.tree.map(lambda a: a.sharding, state)
    stored = spec_table(shard.params)  # as the train step declares them

    def update(grads, opt_state, params):
        with sharding.use_rules(mesh, sharding.TRAIN), sharding.constraints.stored_specs(stored):
            return opt.update(grads, opt_state, params)

    fn = jit(
        update,
        in_shardings=(shard.params, shard.opt_state, shard.params),
        out_shardings=(shard.params, shard.opt_state),
    )
    t0 = time.perf_counter()
    compiled = fn.lower(state.params, state.opt_state, state.params).compile()
    seconds = time.perf_counter() - t0
    text = compiled.as_text()
    if hlo_dir is not None:
        (hlo_dir / f"muon_update_{layout}.hlo.txt").write_text(text)
    coll, _ = collective_bytes(text)
    labels = jax.tree.leaves(partition(state.params))
    muon = [
        a for a, lab in zip(jax.tree.leaves(state.params), labels, strict=True) if lab == "muon"
    ]
    total = sum(math.prod(a.shape) * a.dtype.itemsize for a in muon)
    share = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in muon)
    return dict(
        layout=layout, compile_s=seconds, collectives=coll, muon_total=total, muon_share=share
    )


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    layouts = [x.strip() for x in a.layouts.split(",") if x.strip()]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad or not layouts:
        cli.fail(f"--layouts: expected some of {', '.join(LAYOUTS)}, got {a.layouts!r}")
    out = cli.output_file("--json", a.json)
    hlo = None
    if a.hlo:
        hlo = pathlib.Path(a.hlo)
        if hlo.exists() and not hlo.is_dir():
            cli.fail(f"--hlo {hlo}: not a folder")
        hlo.mkdir(parents=True, exist_ok=True)
    import sharding

    try:
        n = math.prod(sharding.parse_mesh_spec(a.mesh).values())
    except ValueError as e:
        cli.fail(f"--mesh: {e}")
    _plan()._fake_devices(n)
    import v4jax

    cfg = getattr(v4jax.config, a.model)()
    mesh = sharding.make_mesh(a.mesh)
    rows = [measure(cfg, mesh, layout, hlo) for layout in layouts]
    gb = lambda b: f"{b / 1e9:10.4f}"
    kinds = [k for k in rows[0]["collectives"] if any(r["collectives"][k] for r in rows)]
    total, share = rows[0]["muon_total"], rows[0]["muon_share"]
    print(
        f"model {a.model}, mesh {dict(mesh.shape)}: Muon matrices {total / 1e9:.4f} GB, "
        f"one device's ZeRO share {share / 1e9:.4f} GB"
    )
    print("per-device collective GB of one optimizer update:")
    print(f"{'layout':<12}" + "".join(f"{k:>20}" for k in kinds) + f"{'sum':>12}{'compile s':>11}")
    for r in rows:
        c = r["collectives"]
        print(
            f"{r['layout']:<12}"
            + "".join(f"{gb(c[k]):>20}" for k in kinds)
            + f"{gb(sum(c.values())):>12}{r['compile_s']:>11.1f}"
        )
    print(
        f"floors: replicated receives >= {gb(total - share).strip()} GB (all but its share); "
        f"owner moves ~2 x {gb(share).strip()} GB (its share, there and back)"
    )
    if out:
        out.write_text(json.dumps(dict(model=a.model, mesh=dict(mesh.shape), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
