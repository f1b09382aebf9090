"""`scripts/plan.py --train` (issue 11 §5): the abstract train state's per-device bytes, the
collective count of compiled HLO, and the whole compiled step's plan on 8 fake CPU devices
(tests/conftest.py) against a 1-device mesh."""

import importlib.util
import json
import math
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import sharding
import v4jax
from sharding.train_plan import collective_bytes, tree_bytes

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plan():
    spec = importlib.util.spec_from_file_location("plan_train_cli", REPO / "scripts" / "plan.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _shards(a) -> int:
    """Distinct pieces a leaf is cut into, from jax's device -> index map (not shard_shape)."""
    idx = a.sharding.devices_indices_map(a.shape)
    return len({tuple((s.start, s.stop) for s in i) for i in idx.values()})


def test_state_bytes_split_with_fsdp(plan):
    """ZeRO: params and optimizer moments per device shrink 4x from fsdp=2 to fsdp=8 on every
    leaf that fsdp=8 splits 8 ways; per-device bytes equal an independent count (bytes / number
    of distinct shards, from each sharding's index map), exactly; AdamW holds two moments per
    parameter, so its state is 2x the params per device plus the scalar step counts."""
    cfg = v4jax.config.tiny()
    per = {}
    for n in (2, 8):
        mesh = sharding.make_mesh(f"fsdp={n}", devices=jax.devices()[:n])
        _, state, _ = plan.abstract_train_state(cfg, mesh, sharding.TRAIN, "adamw")
        for tree in (state.params, state.opt_state):
            leaves = jax.tree.leaves(tree)
            want = sum(math.prod(a.shape) * a.dtype.itemsize // _shards(a) for a in leaves)
            assert tree_bytes(tree).per_device == want
        p, o = tree_bytes(state.params), tree_bytes(state.opt_state)
        scalars = sum(a.dtype.itemsize for a in jax.tree.leaves(state.opt_state) if a.ndim == 0)
        assert o.per_device == 2 * p.per_device + scalars
        per[n] = {
            jax.tree_util.keystr(k): (math.prod(a.sharding.shard_shape(a.shape)), _shards(a))
            for k, a in jax.tree_util.tree_leaves_with_path(state)
        }
    split8 = [k for k, (_, s) in per[8].items() if s == 8]
    assert all(per[2][k][0] == 4 * per[8][k][0] for k in split8)
    total = {k: per[2][k][0] * per[2][k][1] for k in per[2]}
    # ~1/devices: tiny's small leaves (norm gains, mHC, biases, the step count) stay whole,
    # 10% of its state; at full size they are a far smaller part
    assert sum(total[k] for k in split8) > 0.85 * sum(total.values())


_HLO = """HloModule m

%inner (p: (s32[], bf16[16])) -> (s32[], bf16[16]) {
  %p = (s32[], bf16[16]) parameter(0)
  %g = bf16[16]{0} all-gather(bf16[2]{0} %x), dimensions={0}
  ROOT %t = (s32[], bf16[16]) tuple(%i, %g)
}

%outer (q: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %q = (s32[], f32[4,8]) parameter(0)
  %ar = f32[4,8]{1,0} all-reduce(f32[4,8]{1,0} %y), to_apply=%add
  %w = (s32[], bf16[16]) while(%t0), condition=%c, body=%inner, backend_config=TRIPS2
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %ar)
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %cp = s32[2]{0} collective-permute(s32[2]{0} %z), source_target_pairs={{0,1}}
  %w2 = (s32[], f32[4,8]) while(%t1), condition=%c2, body=%outer, backend_config=TRIPS3
  ROOT %r = f32[4,8]{1,0} get-tuple-element(%w2), index=1
}
"""


def test_collective_bytes_multiplies_loop_trips():
    """Hand-written HLO: an all-reduce in a 3-trip loop, an all-gather in a 2-trip loop nested
    in it, a collective-permute at the top: result bytes x enclosing trip counts."""
    hlo = _HLO.replace("TRIPS2", '{"known_trip_count":{"n":"2"}}')
    got, loops = collective_bytes(hlo.replace("TRIPS3", '{"known_trip_count":{"n":"3"}}'))
    assert got["all-reduce"] == 3 * 4 * 8 * 4
    assert got["all-gather"] == 3 * 2 * 16 * 2
    assert got["collective-permute"] == 2 * 4
    assert got["all-to-all"] == got["reduce-scatter"] == 0
    assert sorted(t for _, t in loops) == [2, 3]


def test_collective_bytes_of_a_compiled_scan():
    """A real compiled program: 5 scan steps, each a matmul whose contracting dim is split 8
    ways, so each step all-reduces its [4, 16] float32 partial product (256 B per device)."""
    mesh = sharding.make_mesh("fsdp=8")
    w = jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    xs = jax.ShapeDtypeStruct(
        (5, 4, 64), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(None, None, "fsdp"))
    )

    def f(w, xs):
        def body(c, x):
            y = jnp.tanh(x @ w)  # [4, 16], summed over the split dim
            return c + y, None

        return jax.lax.scan(body, jnp.zeros((4, 16), jnp.float32), xs)[0]

    rep = NamedSharding(mesh, PartitionSpec())
    text = jax.jit(f, out_shardings=rep).lower(w, xs).compile().as_text()
    got, _ = collective_bytes(text)
    assert got["all-reduce"] == 5 * 4 * 16 * 4, got


def test_partitioned_collectives_keep_bf16_and_count_loop_trips():
    """A scan of 5 steps, each gathering a weight split 8 ways after casting it to bf16: the
    SPMD partitioner emits a bf16 all-gather (5 x 64 x 64 x 2 bytes per device, its trip
    count read from the jax loop's condition, as XLA has not annotated it yet); XLA:CPU's
    compiled program runs it in float32 (twice the bytes)."""
    from sharding.train_plan import partitioned_hlo

    mesh = sharding.make_mesh("fsdp=8")
    split = NamedSharding(mesh, PartitionSpec(None, "fsdp"))
    ws = jax.ShapeDtypeStruct((5, 64, 64), jnp.float32, sharding=split)
    v = jax.ShapeDtypeStruct((4, 64), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))

    def f(ws, v):
        def body(c, w):
            w = jax.lax.with_sharding_constraint(
                w.astype(jnp.bfloat16), split.update(spec=PartitionSpec("fsdp"))
            )
            w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, PartitionSpec()))
            return c @ w.astype(jnp.float32), None

        return jax.lax.scan(body, v, ws)[0]

    text, compiled = partitioned_hlo(jax.jit(f).lower(ws, v))
    got, loops = collective_bytes(text)
    assert got["all-gather"] == 5 * 64 * 64 * 2 and [t for _, t in loops] == [5], (got, loops)
    cpu, _ = collective_bytes(compiled.as_text())
    assert cpu["all-gather"] == 2 * got["all-gather"], cpu


_TINY = v4jax.config.tiny


def _small():
    """One window layer + MTP: the whole train step at the least compile time."""
    return _TINY(compress_ratios=(0, 0), num_hash_layers=0)


@pytest.mark.slow
def test_train_plan_sharded_vs_one_device(plan, tmp_path, capsys, monkeypatch):
    """The whole step compiles on 'fsdp=2 x expert=4' (collectives > 0, every memory field)
    and on one device (no collectives); a 1 MB device does not fit (one line, JSON too)."""
    out = tmp_path / "plan.json"
    argv = ["--train", "--model", "tiny", "--mesh", "fsdp=2 x expert=4", "--batch", "8"]
    argv += ["--seq", "16", "--optimizer", "adamw", "--hbm-gb", "0.001", "--json", str(out)]
    monkeypatch.setattr(v4jax.config, "tiny", _small)  # --model tiny: the one-layer variant
    monkeypatch.setenv("XLA_FLAGS", "")  # restored afterwards (main appends the device count)
    assert plan.main(argv) == 0
    text = capsys.readouterr().out
    assert re.search(r"^verdict: DOES NOT FIT: [\d.]+ GB \([\d.]+ GiB\) over", text, re.M), text
    r = json.loads(out.read_text())
    assert not r["fits"] and r["over"] > 0
    assert all(r["memory"][k] > 0 for k in ("argument", "output", "temp"))
    assert r["memory"]["alias"] > 0  # the donated state is updated in place
    assert sum(r["collectives"].values()) > 0
    # the bf16 weight gathers: float32 in XLA:CPU's program, bf16 as partitioned
    assert 0 < r["collectives_partitioned"]["all-gather"] < r["collectives"]["all-gather"]
    one = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    r1 = plan.plan_train(_small(), one, "train", batch=2, seq=16, optimizer="adamw")
    assert sum(r1["collectives"].values()) == 0
    assert r1["params"]["per_device"] == r1["params"]["total"]
    assert np.isclose(r1["params"]["total"], r["params"]["total"])


BAD = [
    (["--remat", "block"], "--remat"),  # a train flag without --train
    (["--train", "--remat", "banana"], "--remat"),
    (["--train", "--accum", "0"], "--accum"),
    (["--train", "--optimizer", "sgd"], "--optimizer"),
    (["--train", "--seq", "1"], "--seq"),
    (["--train", "--json", "/no/such/folder/plan.json"], "--json"),
    (["--train", "--mesh", "fsdp=0"], "--mesh"),
    (["--moe-buffer", "2"], "--moe-buffer"),  # without --train
    (["--train", "--moe-buffer", "0.5"], "--moe-buffer"),
]


@pytest.mark.parametrize("argv, flag", BAD)
def test_bad_train_flags_refused_before_compiling(plan, capsys, monkeypatch, argv, flag):
    """One `error:` line naming the flag, status 2, before any device or model exists."""
    monkeypatch.setattr(plan, "plan_train", lambda *a, **k: pytest.fail("planned anyway"))
    monkeypatch.setenv("XLA_FLAGS", "")  # restored afterwards (main appends the device count)
    with pytest.raises(SystemExit) as e:
        plan.main(argv)
    assert e.value.code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], lines


def test_muon_owner_update_moves_less_than_gather_all():
    """`scripts/bench_muon_zero.py` on the tiny model, `fsdp=4 x expert=2`: the owner layout's
    update moves less than the gather-all (README table) and runs no Newton-Schulz matmul on
    the stored shards (no all-reduce beyond the clipping norm's scalars; a back-move that
    left Newton-Schulz unconstrained measured 69 MB of all-reduce here)."""
    spec = importlib.util.spec_from_file_location(
        "bench_muon_cli", REPO / "scripts" / "bench_muon_zero.py"
    )
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    mesh = sharding.make_mesh("fsdp=4 x expert=2")
    cfg = v4jax.config.tiny()
    owner = bench.measure(cfg, mesh, "owner")["collectives"]
    gather_all = bench.measure(cfg, mesh, "replicated")["collectives"]
    assert owner["all-reduce"] <= 1024, owner
    assert sum(owner.values()) < 0.6 * sum(gather_all.values()), (owner, gather_all)
