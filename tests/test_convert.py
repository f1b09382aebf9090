"""Checkpoint conversion (issue 3): release <-> Orbax round trips byte for byte, equal logits,
bad inputs named, interrupted conversions leave nothing that looks finished, and what a killed
one leaves is cleaned up by the next (issue 14)."""

import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import v4jax
from v4jax.checkpoint import convert, export, orbax_io
from v4jax.checkpoint.convert import hf_to_orbax, orbax_to_hf
from v4jax.checkpoint.safetensors import (
    INDEX_FILE,
    ShardedCheckpoint,
    write_index,
    write_safetensors,
)
from v4jax.checkpoint.synthetic import random_release_tensors, write_release_checkpoint
from v4jax.numerics.quantize import dequantize_fp4, dequantize_fp8_blocks

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"
TOKENS = np.array([[3, 5, 7, 11, 13, 600, 2, 9, 1000, 42]])
CFG = v4jax.config.tiny(compress_ratios=(0, 4, 128, 0), num_hash_layers=1)  # small, all kinds


def _digests(folder: pathlib.Path) -> dict[str, str]:
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.iterdir())
        if f.is_file()
    }


def _tensors(folder) -> dict[str, tuple[str, tuple, bytes]]:
    with ShardedCheckpoint(folder) as c:
        return {n: (c.info(n).dtype, c.info(n).shape, c.get(n).tobytes()) for n in c.keys()}


def _nothing_written(dst: pathlib.Path) -> None:
    """No DST, no temporary directory left beside it, no marker anywhere."""
    assert not dst.exists()
    assert not [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def _release(folder: pathlib.Path, tensors: dict, cfg=CFG) -> pathlib.Path:
    """A one-shard release folder holding `tensors`."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(v4jax.config.to_dict(cfg)))
    write_safetensors(folder / "model-00001-of-00001.safetensors", tensors)
    wmap = dict.fromkeys(tensors, "model-00001-of-00001.safetensors")
    write_index(folder, wmap, sum(a.nbytes for a in tensors.values()))
    return folder


@pytest.fixture(scope="module")
def tensors():
    return random_release_tensors(CFG, seed=0)


@pytest.fixture(scope="module")
def fixture_orbax(fixture_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("fixture") / "orbax"
    hf_to_orbax(fixture_dir, dst)
    return dst


# ----------------------------------------------------------------------------- round trips


def test_fixture_round_trip_is_byte_exact(fixture_dir, fixture_orbax, tmp_path):
    """release -> Orbax -> release: every file (shards, header order and metadata, index,
    config.json) comes back byte for byte, so every tensor's name, dtype, shape and bytes."""
    back = tmp_path / "hf"
    r = orbax_to_hf(fixture_orbax, back)
    assert r.tensors == len(_tensors(fixture_dir)) and r.nbytes > 7_000_000
    want = {k: v for k, v in _digests(fixture_dir).items() if k.endswith((".json", "tensors"))}
    assert _digests(back) == want
    assert _tensors(back) == _tensors(fixture_dir)
    release = sum(f.stat().st_size for f in fixture_dir.glob("*.safetensors"))
    orbax = sum(f.stat().st_size for f in fixture_orbax.rglob("*") if f.is_file())
    assert orbax < 1.1 * release  # release formats kept: not 2-4x larger


def test_orbax_copy_gives_the_same_logits(fixture_orbax, ref_model):
    model = v4jax.load(fixture_orbax)
    assert np.array_equal(np.asarray(model.logits(TOKENS)), np.asarray(ref_model.logits(TOKENS)))


@pytest.mark.parametrize(
    "cfg",
    [
        v4jax.config.tiny(expert_dtype="fp8"),
        v4jax.config.tiny(compress_ratios=(4, 128, 4, 0), num_hash_layers=0),
        v4jax.config.tiny(compress_ratios=(0, 128, 4), num_layers=3, num_mtp_layers=0),
    ],
    ids=["fp8-experts", "no-hash-layers", "no-mtp"],
)
def test_synthetic_round_trip_is_byte_exact(cfg, tmp_path):
    src = write_release_checkpoint(cfg, tmp_path / "src", seed=3, shards=2)
    hf_to_orbax(src, tmp_path / "orbax")
    orbax_to_hf(tmp_path / "orbax", tmp_path / "hf")
    assert _digests(tmp_path / "hf") == _digests(src)


def test_single_file_release_round_trip(tmp_path, tensors):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(v4jax.config.to_dict(CFG)))
    write_safetensors(src / "model.safetensors", tensors, metadata={"format": "pt"})
    hf_to_orbax(src, tmp_path / "orbax")
    orbax_to_hf(tmp_path / "orbax", tmp_path / "hf")
    assert _digests(tmp_path / "hf") == _digests(src)  # no index appears


def _state(model) -> dict:
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(model.state)}


def test_orbax_state_equals_release_state(tmp_path):
    """Loading the Orbax copy gives the release's parameter state bit for bit (every leaf,
    dtype and placement alike), so every function of it (logits, MTP, decode) agrees."""
    cfg = v4jax.config.tiny(compress_ratios=(0, 4, 0), num_hash_layers=1, expert_dtype="fp8")
    src = write_release_checkpoint(cfg, tmp_path / "src", seed=5, shards=1)
    hf_to_orbax(src, tmp_path / "orbax")
    a, b = v4jax.load(src, progress=False), v4jax.load(tmp_path / "orbax")
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        x, y = sa[k], sb[k]
        assert (x.dtype, x.shape, x.sharding) == (y.dtype, y.shape, y.sharding), k
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), k


def _dequant(folder) -> dict[str, np.ndarray]:
    """Every quantised weight of a release folder, dequantised (float32)."""
    with ShardedCheckpoint(folder) as c:
        out = {}
        for n in c.keys():
            w = c.get(n)
            if n.endswith(".weight") and w.dtype in (ml_dtypes.float8_e4m3fn, np.int8):
                f = dequantize_fp4 if w.dtype == np.int8 else dequantize_fp8_blocks
                out[n] = f(w, c.get(n.removesuffix(".weight") + ".scale"))
        return out


def test_bf16_mode(fixture_dir, tmp_path, ref_model):
    """--dtype bf16 stores dequantised weights (no scales); restore re-quantises: the values,
    hence the logits, come back exactly."""
    import orbax.checkpoint as ocp

    dst = tmp_path / "bf16"
    hf_to_orbax(fixture_dir, dst, dtype="bf16")
    with ocp.StandardCheckpointer() as c:  # plain Orbax, as a researcher would
        tree = c.restore(dst / "state")
    w = tree["segments"]["0"]["blocks"]["0"]["ffn"]["experts"]["w1"]  # [R, E, F, D] FP4 -> bf16
    assert w.dtype == ml_dtypes.bfloat16 and w.shape == (1, 8, 128, 256)
    assert "w1_scale" not in tree["segments"]["0"]["blocks"]["0"]["ffn"]["experts"]
    ref = _dequant(fixture_dir)
    assert np.array_equal(w[0, 3].astype(np.float32), ref["layers.0.ffn.experts.3.w1.weight"])
    got = v4jax.load(dst).logits(TOKENS)
    assert np.array_equal(np.asarray(got), np.asarray(ref_model.logits(TOKENS)))
    orbax_to_hf(dst, tmp_path / "hf")
    back, src = _tensors(tmp_path / "hf"), _tensors(fixture_dir)
    assert {n: v[:2] for n, v in back.items()} == {n: v[:2] for n, v in src.items()}
    deq = _dequant(tmp_path / "hf")
    assert deq.keys() == ref.keys() and all(np.array_equal(deq[n], ref[n]) for n in ref)


def test_model_save_load_and_export_hf(tmp_path):
    model = v4jax.init(v4jax.config.tiny(), seed=1)  # the fixture's shapes: shares its jit
    want = np.asarray(model.logits(TOKENS))
    model.save(tmp_path / "orbax")
    assert np.array_equal(np.asarray(v4jax.load(tmp_path / "orbax").logits(TOKENS)), want)
    model.save(tmp_path / "orbax-bf16", dtype="bf16")
    assert np.array_equal(np.asarray(v4jax.load(tmp_path / "orbax-bf16").logits(TOKENS)), want)
    v4jax.export_hf(model, tmp_path / "hf")
    assert np.array_equal(
        np.asarray(v4jax.load(tmp_path / "hf", progress=False).logits(TOKENS)), want
    )
    rel = random_release_tensors(v4jax.config.tiny(), seed=1)
    got = _tensors(tmp_path / "hf")
    assert {n: a.tobytes() for n, a in rel.items()} == {n: v[2] for n, v in got.items()}
    orbax_to_hf(tmp_path / "orbax", tmp_path / "hf2")
    assert _digests(tmp_path / "hf2") == _digests(tmp_path / "hf")
    with pytest.raises(v4jax.CheckpointError, match="already exists"):
        model.save(tmp_path / "orbax")


def test_restore_places_leaves_with_given_shardings(fixture_orbax):
    """The hook for mesh placement: Orbax restores each leaf straight onto its sharding."""
    leaves = convert.state_leaves(v4jax.config.tiny())
    mesh = jax.make_mesh((8,), ("x",))
    p = ("segments", 0, "blocks", 0, "ffn", "experts", "w1")  # [1, 8, 128, 128] int8
    where = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
    got = convert.restore_state(fixture_orbax, leaves, shardings={p: where})
    plain = convert.restore_state(fixture_orbax, leaves)
    assert got[p].sharding == where and len(got[p].addressable_shards) == 8
    assert all(np.array_equal(np.asarray(got[k]), np.asarray(plain[k])) for k in leaves)


# ----------------------------------------------------------------------------- what a folder is


def test_load_says_what_a_folder_is_not(tmp_path, fixture_dir, fixture_orbax):
    (tmp_path / "empty").mkdir()
    with pytest.raises(v4jax.CheckpointError, match="not an official release .* nor a v4jax Orbax"):
        v4jax.load(tmp_path / "empty")
    with pytest.raises(v4jax.CheckpointError, match="Orbax checkpoint not written by v4jax"):
        v4jax.load(fixture_orbax / "state")
    with pytest.raises(v4jax.CheckpointError, match="is a v4jax Orbax checkpoint, not an offic"):
        hf_to_orbax(fixture_orbax, tmp_path / "x")
    with pytest.raises(v4jax.CheckpointError, match="is an official release folder, not a v4j"):
        orbax_to_hf(fixture_dir, tmp_path / "x")
    with pytest.raises(v4jax.CheckpointError, match="not a directory .does not exist"):
        orbax_to_hf(tmp_path / "nope", tmp_path / "x")
    _nothing_written(tmp_path / "x")


# ----------------------------------------------------------------------------- bad inputs


def _bad(src, dst, match):
    with pytest.raises(v4jax.CheckpointError, match=match):
        hf_to_orbax(src, dst)
    _nothing_written(dst)


def test_missing_tensor(tmp_path, tensors):
    t = dict(tensors)
    del t["layers.1.attn.wq_b.scale"]
    match = r"missing tensor layers\.1\.attn\.wq_b\.scale \(expected F8_E8M0"
    _bad(_release(tmp_path / "s", t), tmp_path / "d", match)


def test_unexpected_tensor(tmp_path, tensors):
    t = dict(tensors, **{"layers.0.attn.bogus.weight": np.zeros(3, np.float32)})
    _bad(_release(tmp_path / "s", t), tmp_path / "d", r"unexpected tensor layers\.0\.attn\.bogus")


def test_wrong_shape(tmp_path, tensors):
    t = dict(tensors, **{"layers.0.attn.kv_norm.weight": np.ones(64, ml_dtypes.bfloat16)})
    match = r"kv_norm\.weight: expected BF16 \[128\], found BF16 \[64\]"
    _bad(_release(tmp_path / "s", t), tmp_path / "d", match)


def test_wrong_dtype(tmp_path, tensors):
    t = dict(tensors)
    t["layers.0.attn.wq_a.weight"] = t["layers.0.attn.wq_a.weight"].astype(np.float32)
    match = r"wq_a\.weight: expected F8_E4M3 \[128, 256\], found F32 \[128, 256\]"
    _bad(_release(tmp_path / "s", t), tmp_path / "d", match)


def test_truncated_shard(tmp_path, tensors):
    src = _release(tmp_path / "s", tensors)
    shard = src / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    _bad(src, tmp_path / "d", r"model-00001-of-00001\.safetensors: tensor .* file is truncated")


def test_corrupted_header(tmp_path, tensors):
    src = _release(tmp_path / "s", tensors)
    shard = src / "model-00001-of-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[8:12] = b"#!@$"
    shard.write_bytes(bytes(raw))
    _bad(src, tmp_path / "d", r"corrupted header: invalid JSON")
    (n,) = struct.unpack("<Q", raw[:8])
    shard.write_bytes(struct.pack("<Q", n + 10**9) + bytes(raw[8:]))
    _bad(src, tmp_path / "d", r"corrupted header: header length \d+ exceeds the file size")


def test_index_points_to_a_missing_shard(tmp_path, tensors):
    src = _release(tmp_path / "s", tensors)
    index = json.loads((src / INDEX_FILE).read_text())
    index["weight_map"]["norm.weight"] = "model-00002-of-00002.safetensors"
    (src / INDEX_FILE).write_text(json.dumps(index))
    _bad(src, tmp_path / "d", r"shard 'model-00002-of-00002\.safetensors' .* does not exist")


def test_config_disagrees_with_weights(tmp_path, tensors):
    src = _release(tmp_path / "s", tensors, cfg=CFG.replace(moe_inter_dim=256))
    _bad(src, tmp_path / "d", r"shared_experts\.w1\.weight: expected F8_E4M3 \[256, 256\], found")


def test_unreadable_config(tmp_path, tensors):
    src = _release(tmp_path / "s", tensors)
    (src / "config.json").write_text('{"model_type": "llama"}')
    _bad(src, tmp_path / "d", r"config\.json: model_type='llama'")


@pytest.mark.parametrize(
    ("name", "value"), [("norm.weight", np.nan), ("layers.0.hc_attn_base", np.inf)]
)
def test_nan_or_inf(tmp_path, tensors, name, value):
    t = dict(tensors)
    t[name] = t[name].copy()
    t[name][1] = value
    _bad(_release(tmp_path / "s", t), tmp_path / "d", rf"{name}: contains NaN or Inf")


def test_tid2eid_out_of_range(tmp_path, tensors):
    t = dict(tensors)
    t["layers.0.ffn.gate.tid2eid"] = t["layers.0.ffn.gate.tid2eid"] + 100
    _bad(_release(tmp_path / "s", t), tmp_path / "d", r"tid2eid: expert ids outside \[0, 8\)")


def test_dst_already_exists(tmp_path, tensors):
    src = _release(tmp_path / "s", tensors)
    (dst := tmp_path / "d").mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(v4jax.CheckpointError, match=r"already exists \(overwrite=True"):
        hf_to_orbax(src, dst)
    assert (dst / "keep.txt").read_text() == "mine" and not (dst / orbax_io.MARKER).exists()
    with pytest.raises(v4jax.CheckpointError, match="must not be, contain or lie inside"):
        hf_to_orbax(src, src / "inner", overwrite=True)
    hf_to_orbax(src, dst, overwrite=True)
    assert (dst / orbax_io.MARKER).exists() and not (dst / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_corrupted_orbax_checkpoint(tmp_path, tensors):
    src = _release(tmp_path / "s", tensors)
    hf_to_orbax(src, orbax := tmp_path / "o")
    meta = json.loads((orbax / "state" / "_METADATA").read_text())
    del meta["tree_metadata"]["('norm', 'weight')"]
    (orbax / "state" / "_METADATA").write_text(json.dumps(meta))
    with pytest.raises(v4jax.CheckpointError, match=r"missing array norm\.weight"):
        orbax_to_hf(orbax, tmp_path / "d")
    _nothing_written(tmp_path / "d")
    (orbax / orbax_io.MARKER).write_text("{not json")
    with pytest.raises(v4jax.CheckpointError, match=r"v4jax\.json: corrupted marker"):
        v4jax.load(orbax)


# ----------------------------------------------------------------------------- interruption


def test_interrupted_conversion_leaves_nothing(tmp_path, tensors, monkeypatch):
    src = _release(tmp_path / "s", tensors)
    write, calls = orbax_io.StateWriter.write, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 40:
            raise KeyboardInterrupt  # as Ctrl-C mid-way
        return write(self, *args)

    monkeypatch.setattr(orbax_io.StateWriter, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        hf_to_orbax(src, tmp_path / "d")
    _nothing_written(tmp_path / "d")


def test_interrupted_overwrite_keeps_the_old_output(tmp_path, tensors, monkeypatch):
    src = _release(tmp_path / "s", tensors)
    hf_to_orbax(src, orbax := tmp_path / "o")
    orbax_to_hf(orbax, dst := tmp_path / "d")
    before = _digests(dst)

    def failing(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_safetensors_streamed", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        orbax_to_hf(orbax, dst, overwrite=True)
    assert _digests(dst) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# A conversion killed outright (SIGKILL: no `except`, no `finally`) in a child process while it
# writes the Orbax state: the temporary folder it leaves is real, named by the real code.
_KILLED = textwrap.dedent(
    """
    import os, signal, sys
    from v4jax.checkpoint import convert, orbax_io
    write = orbax_io.StateWriter.write
    def write_then_die(self, *args):
        write(self, *args)
        os.kill(os.getpid(), signal.SIGKILL)
    orbax_io.StateWriter.write = write_then_die
    convert.hf_to_orbax(sys.argv[1], sys.argv[2])
    """
)


def _hidden(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_killed_conversion_is_cleaned_up_by_the_next(tmp_path, tensors, caplog):
    src, out = _release(tmp_path / "s", tensors), tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # This process holds a live conversion's folder (`staged`) throughout: never removed.
    with (
        caplog.at_level(logging.WARNING, convert.__name__),
        convert.staged(out / "c", False) as live,
    ):
        with subprocess.Popen([sys.executable, "-c", _KILLED, src, out / "a"], env=env) as child:
            assert child.wait(timeout=300) == -signal.SIGKILL
        (dead,) = set(_hidden(out)) - {live.name}  # partial state, no marker, no "a"
        assert (out / dead / orbax_io.STATE).is_dir() and not (out / "a").exists()
        _, dst, what, host, pid, _ = dead.split(".")
        assert (dst, what, pid) == ("a", "v4jax-tmp", str(child.pid))
        # Also kept: another host's folder (its PID means nothing here), the previous output
        # of a killed overwrite whose DST is missing (the only copy), and a look-alike name.
        foreign = dead.replace(f".{host}.", ".another-host.")
        previous = dead.replace(".v4jax-tmp.", ".v4jax-old.")
        for name in (foreign, f"{previous}/x", ".a.tmp-1234abcd"):
            shutil.copytree(out / dead, out / name)
        hf_to_orbax(src, out / "b")
        assert live.is_dir() and (out / "b" / orbax_io.MARKER).is_file()
    assert _hidden(out) == sorted([foreign, previous, ".a.tmp-1234abcd"])
    assert sorted(r.getMessage() for r in caplog.records) == sorted(
        [
            f"removed {out / dead}, left by conversion process {pid} (no longer running)",
            f"{out / previous}: left by killed conversion process {pid}, holds the previous a, "
            f"which is missing: not removed (move {out / previous / 'x'} back to {out / 'a'})",
        ]
    )


# ----------------------------------------------------------------------------- scripts


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli(tmp_path, tensors, capsys):
    cli = _script("convert")
    src = _release(tmp_path / "s", tensors)
    assert cli.main(["hf-to-orbax", str(src), str(tmp_path / "o"), "--no-progress"]) == 0
    with pytest.raises(SystemExit, match="2"):  # usage errors: argparse's exit status 2
        cli.main(["orbax-to-hf", str(tmp_path / "o"), str(tmp_path / "h"), "--dtype"])
    capsys.readouterr()
    assert cli.main(["orbax-to-hf", str(tmp_path / "o"), str(tmp_path / "h")]) == 0
    assert "orbax-to-hf:" in capsys.readouterr().out
    assert _tensors(tmp_path / "h") == _tensors(src)
    assert cli.main(["hf-to-orbax", str(src), str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and err.count("\n") == 1
    t = dict(tensors)
    del t["norm.weight"], t["head.weight"]
    bad = _release(tmp_path / "bad", t)
    assert cli.main(["hf-to-orbax", str(bad), str(tmp_path / "o2"), "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "missing tensor head.weight (expected BF16 [1024, 256]); " in err
    )


def test_bench_script_on_the_fixture(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench_convert.py", "--no-big", "--json", str(out)])
    _script("bench_convert").main()
    assert "tiny-fixture   orbax-to-hf" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["step"] for r in rows] == ["hf-to-orbax keep", "hf-to-orbax bf16", "orbax-to-hf"]
    assert all(r["convert_mb_s"] > 0 and r["read_mb_s"] > 0 for r in rows)
