"""Shared fixtures. Tests run on the CPU with 8 fake devices (as in CI)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURE = pathlib.Path(__file__).parent / "data" / "v4-tiny-flash"


@pytest.fixture(scope="session")
def fixture_dir() -> pathlib.Path:
    return FIXTURE


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "golden.npz") as g:
        return dict(g)


@pytest.fixture(scope="session")
def ref_model():
    import v4jax

    return v4jax.load(FIXTURE, numerics="reference", progress=False)


@pytest.fixture(scope="session")
def smooth_model():
    import v4jax

    return v4jax.load(FIXTURE, numerics="bf16", progress=False)


MAPS = pathlib.Path("/proc/self/maps")
MAPS_LIMIT = 20_000  # a third of the kernel's default vm.max_map_count (65,530)


def _release() -> None:
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module: drop jax's compiled-program caches. Each XLA CPU executable
    keeps ~3 memory mappings; a test worker that compiles ~20,000 programs (a whole run on 2
    workers: many eager ops of many shapes) reaches the kernel's limit of 65,530 mappings
    (`vm.max_map_count`), and the next compile crashes the worker (segfault in the CPU
    compiler; seen in CI). Programs shared between modules are simply compiled again."""
    yield
    _release()


@pytest.fixture(autouse=True)
def _release_before_the_mapping_limit():
    """After any test, the same when this worker holds more than MAPS_LIMIT mappings (one
    long module can compile that many programs on its own)."""
    yield
    if MAPS.exists():
        with MAPS.open("rb") as f:
            if sum(1 for _ in f) > MAPS_LIMIT:
                _release()
