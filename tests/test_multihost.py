"""Multi-host for real: 2 processes on localhost (CPU, `jax.distributed`, gloo collectives),
each with 4 fake devices, run the sharded forward on one 8-device mesh spanning both and get
the single-process logits; and one V4 train step (Muon + AdamW, issue 11 §6) on a mesh spanning
both gives the single-process loss, gradients and optimizer step.

The test runs this file as the worker (`python tests/test_multihost.py WORKER ...`) in two
subprocesses with a free coordinator port and a hard timeout; process 0 writes the gathered
results to an .npz the test compares with an unsharded run in the test process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

# (mesh, rules): expert ranks across both hosts, with all-gather / reduce-scatter dispatch in
# TRAIN and head-parallel attention + psum combine in DECODE.
CASES = (("expert=8", "train"), ("data=2 x expert=2 x tensor=2", "decode"))
B, S, SEED = 4, 40, 1
TIMEOUT_S = 240
TRAIN_MESH, TRAIN_TIMEOUT_S = "fsdp=4 x expert=2", 900


def _config():
    import v4jax

    return v4jax.config.tiny(num_heads=8, index_heads=8)


def _tokens(vocab: int) -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, vocab, (B, S)).astype(np.int32)


def _train_step(tm) -> dict[str, np.ndarray]:
    """Every leaf of (new state, metrics) after one step of tests/test_train_mesh.py's setup
    (its batch, schedule, loss weights and gradient-recording optimizer), gathered to every
    process, in tree order."""
    import jax
    import test_train_mesh as mesh_test
    from jax.experimental import multihost_utils

    from v4jax.train import make_optimizer
    from v4jax.train.step import init_state, make_step

    opt = mesh_test._recording(make_optimizer(tm.params, schedule=mesh_test.SCHED))
    step = make_step(tm, opt, mesh_test.SCHED, mesh_test.WEIGHTS)
    new, metrics = step(init_state(tm, opt), *mesh_test._batch(tm.config))

    def host(x):
        if x.is_fully_replicated:
            return np.asarray(x.addressable_shards[0].data)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return {f"leaf{i}": host(x) for i, x in enumerate(jax.tree.leaves((new, metrics)))}


def _worker(coordinator: str, process_id: int, out: str, mode: str) -> None:
    import sharding

    sharding.initialize(coordinator, 2, process_id, timeout_s=TRAIN_TIMEOUT_S)
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    import v4jax

    assert jax.process_count() == 2 and len(jax.devices()) == 8, jax.devices()
    assert len(jax.local_devices()) == 4
    cfg = _config()
    results = {}
    if mode == "train":
        import test_train_mesh as mesh_test

        from v4jax.train import trainable

        mesh = sharding.make_mesh(TRAIN_MESH)
        model = v4jax.init(
            mesh_test._cfg(), seed=0, numerics="bf16", dtype=jnp.float32, mesh=mesh, rules="train"
        )
        results = _train_step(trainable(model))
    for spec, rules in CASES if mode == "forward" else ():
        mesh = sharding.make_mesh(spec)
        model = v4jax.init(cfg, seed=0, numerics="bf16", dtype=jnp.float32, mesh=mesh, rules=rules)
        logits = model.logits(_tokens(cfg.vocab_size))
        assert not logits.is_fully_addressable  # a global array over both processes
        results[f"{spec}|{rules}"] = np.asarray(
            multihost_utils.process_allgather(logits, tiled=True)
        )
    if process_id == 0:
        np.savez(out + ".tmp.npz", **results)
        os.replace(out + ".tmp.npz", out)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(out: str, logs: str, mode: str, timeout_s: float) -> list[tuple[int | None, str]]:
    """Runs both workers; stops early when one fails (its peer would wait in a collective)."""
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")]),
    )
    coordinator = f"127.0.0.1:{_free_port()}"
    files = [open(os.path.join(logs, f"worker{i}.log"), "w+") for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "WORKER", coordinator, str(i), out, mode],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        for i, f in enumerate(files)
    ]
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:  # on a timeout or a failed peer: stop, never leave workers running
            if p.poll() is None:
                p.kill()
            p.wait()
    results = []
    for p, f in zip(procs, files, strict=True):
        f.seek(0)
        results.append((p.returncode, f.read()))
        f.close()
    return results


def test_two_processes_match_single_process(tmp_path):
    import jax.numpy as jnp

    import v4jax

    out = str(tmp_path / "logits.npz")
    results = _run_pair(out, str(tmp_path), "forward", TIMEOUT_S)
    for i, (rc, log) in enumerate(results):
        assert rc == 0, f"worker {i} failed or timed out (rc {rc}):\n{log[-4000:]}"
    cfg = _config()
    want = np.asarray(
        v4jax.init(cfg, seed=0, numerics="bf16", dtype=jnp.float32).logits(_tokens(cfg.vocab_size))
    )
    with np.load(out) as got:
        assert sorted(got) == sorted(f"{m}|{r}" for m, r in CASES)
        for name in got:
            rel = np.abs(got[name] - want).max() / np.abs(want).max()
            assert rel <= 1e-5, f"{name}: max relative difference {rel:.2e}"


@pytest.mark.slow
def test_two_process_train_step_matches_single_process(tmp_path):
    """One train step on fsdp=4 x expert=2 spanning both processes (each holds half of every
    parameter's shards and half of the batch) equals the unsharded step in this process, by
    tests/test_train_mesh.py's check: loss and gradients to 1e-6, and the new parameters and
    moments equal to the unsharded optimizer applied to the two-process step's own gradients
    (why not the two runs' parameters directly: that file's docstring)."""
    import jax
    import jax.numpy as jnp
    import test_train_mesh as mesh_test

    import v4jax
    from v4jax.train import trainable

    out = str(tmp_path / "train.npz")
    results = _run_pair(out, str(tmp_path), "train", TRAIN_TIMEOUT_S)
    for i, (rc, log) in enumerate(results):
        assert rc == 0, f"worker {i} failed or timed out (rc {rc}):\n{log[-4000:]}"
    cfg = mesh_test._cfg()
    tm = trainable(v4jax.init(cfg, seed=0, numerics="bf16", dtype=jnp.float32))
    state0, m0 = mesh_test._run(tm, *mesh_test._batch(cfg))
    leaves, tree = jax.tree.flatten((state0, m0))
    with np.load(out) as got:
        assert sorted(got) == sorted(f"leaf{i}" for i in range(len(leaves)))
        # npz keeps ml_dtypes (the FP8 scales' float8_e8m0fnu) as raw bytes: same width
        raw = [got[f"leaf{i}"] for i in range(len(leaves))]
        raw = [
            r.view(x.dtype) if r.dtype.kind == "V" else r for r, x in zip(raw, leaves, strict=True)
        ]
        state, m = jax.tree.unflatten(tree, raw)
    mesh_test._compare(tm, state0, m0, state, m, "two processes")


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "WORKER":
    _worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
