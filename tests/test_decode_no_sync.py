"""prefill / decode_step validate without a device-to-host transfer per call (fast-path issue,
item 6): a serving loop keeps tokens and logits on the device."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import array as jax_array

import v4jax
from v4jax.config import tiny


@contextlib.contextmanager
def no_device_reads(monkeypatch):
    """Fails any read of a device array's values on the host: `np.asarray` / `np.array` of a
    jax.Array and the scalar conversions (`int(x)`, `.item()`, `.tolist()`). On the CPU
    backend `jax.transfer_guard` does not fire (host and device memory are the same), so the
    reads are intercepted at the Python level instead."""

    def refuse(*_a, **_k):
        raise AssertionError("device-to-host read")

    def wrap(fn):
        def checked(a, *args, **kwargs):
            if isinstance(a, jax.Array):
                refuse()
            return fn(a, *args, **kwargs)

        return checked

    with monkeypatch.context() as m:
        m.setattr(np, "asarray", wrap(np.asarray))
        m.setattr(np, "array", wrap(np.array))
        m.setattr(jax_array.ArrayImpl, "_value", property(refuse))
        yield


@pytest.fixture(scope="module")
def model():
    return v4jax.init(tiny(), seed=3, numerics="bf16", dtype=jnp.float32)


def test_steps_do_not_read_the_device(model, monkeypatch):
    cache = model.init_cache(2, 16)
    prompt = np.array([[5, 6, 7], [8, 9, 0]], np.int32)
    logits, cache = model.prefill(prompt, cache, lengths=[3, 2])  # host ids: checked on host
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    with no_device_reads(monkeypatch):
        for _ in range(3):
            logits, cache = model.decode_step(tok, cache)
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    np.testing.assert_array_equal(cache.host_pos, [6, 5])
    np.testing.assert_array_equal(np.asarray(cache.pos), cache.host_pos)


def test_guard_catches_a_read(monkeypatch):
    """The guard above is live: the old checks (`np.asarray(cache.pos)`, `int(t.min())`)
    raise inside it."""
    x = jnp.arange(3) + 1
    with no_device_reads(monkeypatch):
        with pytest.raises(AssertionError, match="device-to-host"):
            np.asarray(x)
        with pytest.raises(AssertionError, match="device-to-host"):
            int(x.min())


def test_overflow_still_refused_from_host_positions(model):
    cache = model.init_cache(1, 4)
    logits, cache = model.prefill(np.array([[1, 2, 3]]), cache)
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits, cache = model.decode_step(tok, cache)
    with pytest.raises(ValueError, match="longer than the cache"):
        model.decode_step(tok, cache)


def test_cache_without_host_positions_reads_them_once(model):
    """A cache that came out of a jitted function (host_pos dropped) is still checked."""
    cache = model.init_cache(1, 4)
    _, cache = model.prefill(np.array([[1, 2, 3, 4]]), cache)
    stripped = jax.tree.unflatten(*reversed(jax.tree.flatten(cache)))
    assert stripped.host_pos is None
    with pytest.raises(ValueError, match="longer than the cache"):
        model.decode_step(np.array([1]), stripped)


def test_host_ids_out_of_range_refused(model):
    cache = model.init_cache(1, 8)
    with pytest.raises(ValueError, match="ids must be in"):
        model.prefill(np.array([[1, 5000]]), cache)
