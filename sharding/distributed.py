"""Multi-host start-up: JAX's own multi-controller runtime (`jax.distributed.initialize`).

Every host runs the same program; after `initialize`, `jax.devices()` lists the devices of all
hosts, a mesh built from them (`sharding.make_mesh`) spans the hosts, and every jitted function
runs SPMD on all of them. Each process feeds only its own devices: `v4jax.load(..., mesh=)`
places each parameter with `jax.make_array_from_callback`, which asks a process only for the
shards of its addressable devices. Outputs are global arrays: read them with
`jax.experimental.multihost_utils.process_allgather` (or only where `is_fully_addressable`).

Launch recipes (the same command on every host; call `initialize()` before any other JAX use):

GPU hosts (one process per host, all its GPUs), e.g. 2 x 8 H200::

    # host 0 (10.0.0.1) and host 1, with the same script and arguments:
    V4JAX_COORDINATOR=10.0.0.1:1234 V4JAX_NUM_PROCESSES=2 V4JAX_PROCESS_ID=<0|1> \\
        python my_eval.py --mesh 'data=2 x expert=8'
    # under SLURM (srun --ntasks-per-node=1 ...) or Open MPI, call initialize() with no
    # arguments: JAX detects the coordinator, process count and id from the environment.

TPU slices (e.g. v5p-64: 8 hosts x 4 chips)::

    gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all \\
        --command='python my_eval.py --mesh "fsdp=4 x expert=8"'
    # on Cloud TPU, initialize() needs no arguments (the slice's metadata names the workers).

CPU (tests; each process fakes its devices)::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
    V4JAX_COORDINATOR=localhost:12345 V4JAX_NUM_PROCESSES=2 V4JAX_PROCESS_ID=<0|1> python ...
    # CPU collectives across processes use gloo (set here).
"""

from __future__ import annotations

import os

import jax

__all__ = ["initialize", "is_initialized"]

_ENV = ("V4JAX_COORDINATOR", "V4JAX_NUM_PROCESSES", "V4JAX_PROCESS_ID")


def is_initialized() -> bool:
    return jax.distributed.is_initialized()


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: list[int] | None = None,
    timeout_s: int = 300,
) -> None:
    """Joins this process to the multi-controller job (idempotent).

    Arguments default to `V4JAX_COORDINATOR` ("host:port" of process 0),
    `V4JAX_NUM_PROCESSES` and `V4JAX_PROCESS_ID`; where none are given JAX auto-detects them
    (Cloud TPU, SLURM, Open MPI). With a single process and nothing to detect, this is a no-op
    call of `jax.distributed.initialize` that JAX handles itself.
    """
    if is_initialized():
        return
    env = {k: os.environ.get(k) for k in _ENV}
    coordinator = coordinator or env["V4JAX_COORDINATOR"]
    if num_processes is None and env["V4JAX_NUM_PROCESSES"]:
        num_processes = int(env["V4JAX_NUM_PROCESSES"])
    if process_id is None and env["V4JAX_PROCESS_ID"]:
        process_id = int(env["V4JAX_PROCESS_ID"])
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=timeout_s,
    )
