"""The train loop: exact resume in a new process, determinism, NaN stop, accumulation, CLI errors.

Tiny config (vocab 1024: the data pipeline uses UTF-8 bytes), float32 activations, so every
comparison below is bitwise (CPU, one process, same shapes)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax.train import data as tdata
from v4jax.train import loop, optim
from v4jax.train import model as tmodel
from v4jax.train.checkpoint import Checkpointer
from v4jax.train.step import LossWeights, init_state, make_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = (
    "The quick brown fox jumps over the lazy dog. " * 8,
    "Pack my box with five dozen liquor jugs; " * 10,
    "How vexingly quick daft zebras jump! " * 9,
    "Sphinx of black quartz, judge my vow. " * 7,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i, t in enumerate(TEXT):
        (d / f"doc{i}.txt").write_text(t)
    return str(d)


def _cli(*args, check=True):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), *args]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if check and r.returncode:
        raise AssertionError(f"{cmd} failed:\n{r.stdout}\n{r.stderr}")
    return r


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _final_params(out, step):
    with Checkpointer(os.path.join(out, "checkpoints")) as ck:
        meta = ck.read_meta(step)
        assert meta["config"]["vocab_size"] == 1024
        restored = ck._manager.restore(step)
    return jax.tree.leaves(restored["state"])


COMMON = (
    "--preset",
    "tiny",
    "--steps",
    "4",
    "--batch",
    "2",
    "--seq-len",
    "32",
    "--seed",
    "3",
    "--save-every",
    "2",
    "--heldout",
    "0.0",
    "--lr",
    "1e-3",
    "--warmup",
    "1",
)


@pytest.mark.slow
def test_resume_in_a_new_process_is_exact(corpus, tmp_path):
    """4 steps straight == 2 steps (`--stop-after 2`, same run), then a new process that
    restores and runs 2 more: bitwise-equal losses (data order included) and parameters. Steps
    1-2 come from two processes with one seed: the same curve bit for bit."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _cli(*COMMON, "--data", corpus, "--out", a)
    _cli(*COMMON, "--data", corpus, "--out", b, "--stop-after", "2")
    assert [r["step"] for r in _losses(b)] == [1, 2]
    _cli(*COMMON, "--data", corpus, "--out", b, "--resume")
    la, lb = _losses(a), _losses(b)
    assert [r["step"] for r in la] == [1, 2, 3, 4] == [r["step"] for r in lb]
    for key in ("loss", "ce", "mtp", "grad_norm", "lr"):
        assert [r[key] for r in la] == [r[key] for r in lb], key
    for x, y in zip(_final_params(a, 4), _final_params(b, 4), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert os.path.exists(os.path.join(a, "loss.png"))


def _setup(corpus, out, steps=3):
    model = v4jax.init(v4jax.config.tiny(), seed=1, numerics="bf16", dtype=jnp.float32)
    tm = tmodel.trainable(model)
    dcfg = tdata.DataConfig(paths=(corpus,), seq_len=32, batch_size=2, seed=0)
    data = tdata.build_datasets(dcfg, vocab_size=1024)
    run = loop.RunConfig(out=str(out), steps=steps, lr=1e-3, warmup=1, save_every=1)
    return tm, data, run


def test_nan_stops_with_the_step_and_keeps_the_last_checkpoint(corpus, tmp_path, monkeypatch):
    real = loop.make_step

    def poisoned(*args, **kwargs):
        fn = real(*args, **kwargs)

        def step(state, tokens, mask):
            new, m = fn(state, tokens, mask)
            if int(new.step) == 3:  # the third step "diverges": nothing may be applied
                m = dict(m, loss=jnp.float32(np.nan), finite=jnp.bool_(False))
                new = jax.tree.map(lambda x: x, state)
            return new, m

        return step

    monkeypatch.setattr(loop, "make_step", poisoned)
    tm, data, run = _setup(corpus, tmp_path / "run", steps=5)
    with pytest.raises(loop.Diverged, match="step 3"):
        loop.train(tm, data, run, progress=False, log=lambda *_: None)
    with Checkpointer(tmp_path / "run" / "checkpoints") as ck:
        assert ck.latest_step() == 2
    assert [r["step"] for r in _losses(tmp_path / "run")] == [1, 2]


def test_step_does_not_apply_a_non_finite_update(corpus, tmp_path):
    tm, data, run = _setup(corpus, tmp_path)
    bad = jax.tree.map(lambda a: a, tm.params)
    bad["embed"] = bad["embed"].at[0, 0].set(jnp.nan)
    tm = tm.replace(params=bad)
    opt = optim.make_optimizer(tm.params, schedule=1e-3)
    state = init_state(tm, opt)
    before = jax.tree.map(np.asarray, state)
    step = make_step(tm, opt, run.schedule(), LossWeights())
    batch = next(iter(data.train))
    assert (batch.tokens == 0).any()  # BOS (id 0) reads the NaN embedding row
    new, m = step(state, batch.tokens[None], batch.mask[None])
    assert not bool(m["finite"])
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(new), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_accumulation_equals_the_larger_batch(corpus, tmp_path):
    """2 micro-batches of 2 rows == one batch of 4 rows, float32. With SGD at learning rate 1
    the update is minus the accumulated gradient, so comparing the new parameters compares the
    gradients. The same terms are summed in another order, so each leaf agrees to 1e-5 of its
    largest entry (not per element: entries that are sums of cancelling terms have no relative
    accuracy in either order), plus one rounding of the parameter itself (p - g is stored in
    float32: up to 2.4e-7 for entries near 3). Loss and gradient norm agree to 1e-6 / 1e-5
    relative."""
    import optax

    tm, data, run = _setup(corpus, tmp_path)
    it = iter(
        tdata.build_datasets(
            tdata.DataConfig(paths=(corpus,), seq_len=32, batch_size=4, seed=0), vocab_size=1024
        ).train
    )
    b = next(it)
    opt = optax.sgd(1.0)
    weights = LossWeights(balance=1e-4)
    step = make_step(tm, opt, run.schedule(), weights)
    s1, m1 = step(init_state(tm, opt), b.tokens[None], b.mask[None])
    s2, m2 = step(init_state(tm, opt), b.tokens.reshape(2, 2, 32), b.mask.reshape(2, 2, 32))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    moved = 0
    leaves = zip(
        jax.tree.leaves(tm.params),
        jax.tree.leaves(s1.params),
        jax.tree.leaves(s2.params),
        strict=True,
    )
    for p0, x, y in leaves:
        g1, g2 = np.asarray(p0) - np.asarray(x), np.asarray(p0) - np.asarray(y)
        scale = float(np.abs(g1).max())
        moved += scale > 0
        bound = 1e-5 * scale + np.spacing(np.abs(np.asarray(p0)))
        worst = float(np.max(np.abs(g1 - g2) - bound))
        assert worst <= 0, f"{p0.shape}: gradients differ by {worst:.3g} beyond the bound"
    assert moved > len(jax.tree.leaves(tm.params)) // 2  # the step did train


@pytest.mark.parametrize(
    "args, message",
    [
        (("--preset", "banana"), "--preset 'banana': unknown"),
        (("--preset", "tiny", "--steps", "0"), "--steps must be >= 1"),
        (("--from", "/nonexistent/ckpt"), "--from /nonexistent/ckpt: no such directory"),
        (("--preset", "tiny", "--qat", "--lora", "4"), "cannot be combined"),
        (("--preset", "tiny", "--mesh", "banana=8"), "--mesh: mesh spec 'banana=8': unknown"),
        (("--preset", "tiny", "--mesh", "data=3"), "--mesh: mesh {'data': 3} needs 3 devices"),
        (("--preset", "tiny", "--remat", "some"), "remat='some': expected one of"),
        (("--preset", "tiny", "--moe-buffer", "2"), "--moe-buffer bounds the expert-parallel"),
        (("--preset", "tiny", "--mesh", "expert=8", "--moe-buffer", "0.5"), "must be >= 1"),
    ],
)
def test_cli_refuses_bad_arguments_in_one_line(args, message, corpus, tmp_path):
    r = _cli(*args, "--data", corpus, "--out", str(tmp_path / "o"), check=False)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr


@pytest.mark.parametrize("content", [b"", b"\xff\xfe not utf-8"])
def test_cli_refuses_bad_data_files(content, tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    r = _cli("--preset", "tiny", "--data", str(f), "--out", str(tmp_path / "o"), check=False)
    assert r.returncode == 2 and str(f) in r.stderr and r.stderr.strip().count("\n") == 0
    r = _cli(
        "--preset",
        "tiny",
        "--data",
        str(tmp_path / "missing.txt"),
        "--out",
        str(tmp_path / "o"),
        check=False,
    )
    assert r.returncode == 2 and "missing.txt" in r.stderr
