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
