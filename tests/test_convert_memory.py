"""Streaming conversion: a checkpoint several times larger than a 512 MB resident-memory budget
converts both ways with peak RSS (`resource.getrusage` in a fresh subprocess) under it."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from v4jax.checkpoint.export import write_random_release
from v4jax.checkpoint.synthetic import large_config

# The conversion itself (resident memory above what the process holds once jax + orbax are
# imported: 230-275 MiB depending on the install) may use at most 384 MiB: 1.5x the largest
# tensor (256 MiB), a quarter of the 1482 MiB checkpoint. Measured: 150-245 MiB.
BUDGET_MB = 384


_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import orbax.checkpoint
    from v4jax import config
    from v4jax.checkpoint import convert
    convert.state_leaves(config.tiny())  # imports and traces as a conversion does
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r = getattr(convert, sys.argv[1])(sys.argv[2], sys.argv[3])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"base_mb": base, "peak_mb": peak, "seconds": r.seconds}))
    """
)


# Linux hands a process its parent's peak RSS at exec (ru_maxrss of a child of this big pytest
# process starts at pytest's own peak), so the conversion runs as a grandchild, under a small
# launcher whose peak is a few MB.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def _convert(fn: str, src, dst) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, sys.executable, "-c", _CHILD, fn, str(src), str(dst)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


@pytest.mark.slow
def test_conversion_memory_stays_bounded(tmp_path, record_property):
    nbytes = write_random_release(large_config(), tmp_path / "src", shards=2)
    assert nbytes > 3.5 * BUDGET_MB * 2**20
    to_orbax = _convert("hf_to_orbax", tmp_path / "src", tmp_path / "orbax")
    to_hf = _convert("orbax_to_hf", tmp_path / "orbax", tmp_path / "hf")
    parts = [
        f"{name} peak RSS {r['peak_mb']:.0f} MiB (after imports {r['base_mb']:.0f}; "
        f"{r['seconds']:.1f} s)"
        for name, r in (("hf-to-orbax", to_orbax), ("orbax-to-hf", to_hf))
    ]
    line = f"{nbytes / 2**20:.0f} MiB of tensors, budget {BUDGET_MB} MiB above imports: "
    line += ", ".join(parts)
    print(line)
    record_property("memory", line)
    for r in (to_orbax, to_hf):
        assert r["peak_mb"] - r["base_mb"] < BUDGET_MB, line
    names = sorted(p.name for p in (tmp_path / "src").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "hf").iterdir())
    for name in names:  # byte for byte, streamed
        assert _sha(tmp_path / "src" / name) == _sha(tmp_path / "hf" / name), name
