"""Rematerialisation policies for the training forward (V4 report §3.5).

The backward pass needs the forward's intermediate tensors. A policy chooses which of them are
kept from the forward and which are recomputed from a block's input during the backward:

- "none": keep every residual the backward uses (fastest, most memory);
- "block": keep only each block's input streams and recompute the block (least memory, about
  one extra forward);
- "tensors": the report's tensor-level checkpointing: keep the outputs of the compute-heavy
  operations, named in the model with `checkpoint_name` (`NAMES`: query / key-value
  projections, the sparse attention's context and output, the routed and shared experts'
  outputs) and recompute the cheap ones between them (norms, mHC mixing, routing);
- "save:NAME,NAME,...": keep exactly the named tensors (any subset of `NAMES`);
- "offload" / "offload:NAME,...": keep the "tensors" set (or the named ones) in host memory
  (`pinned_host`) instead of the accelerator's, copied out during the forward and back for the
  backward; needs a backend with a pinned_host memory space (GPU, TPU; XLA:CPU has one too).

The names are identities outside a `jax.checkpoint`, so inference is unaffected. A policy
applies to each block (the scanned units and the MTP block), the unit of recomputation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

__all__ = ["NAMES", "POLICIES", "TENSORS", "check", "name", "policy", "wrap"]

NAMES = ("attn_q", "attn_kv", "attn_ctx", "attn_out", "moe_routed", "moe_shared")
TENSORS = NAMES  # what "tensors" keeps: every compute-heavy output
HOST = "pinned_host"  # where "offload" keeps them
POLICIES = ("none", "block", "tensors", "save:NAME,...", "offload", "offload:NAME,...")


def name(x: jax.Array, label: str) -> jax.Array:
    """x, labelled for the policies (`label` must be in `NAMES`)."""
    return checkpoint_name(x, label)


def check(spec: str) -> tuple[str, ...] | None:
    """The names a policy keeps (None: keep everything, () : keep nothing); a ValueError
    naming the problem for an unknown policy or name."""
    if not isinstance(spec, str):
        raise TypeError(f"remat={spec!r}: expected a string, one of {POLICIES}")
    if spec == "none":
        return None
    if spec == "block":
        return ()
    if spec in ("tensors", "offload"):
        return TENSORS
    prefix = next((p for p in ("save:", "offload:") if spec.startswith(p)), None)
    if prefix:
        names = tuple(n.strip() for n in spec[len(prefix) :].split(",") if n.strip())
        bad = [n for n in names if n not in NAMES]
        if bad or not names:
            raise ValueError(f"remat={spec!r}: unknown tensor name(s) {bad}; known: {NAMES}")
        return names
    raise ValueError(f"remat={spec!r}: expected one of {POLICIES}")


def policy(spec: str):
    """The `jax.checkpoint` policy of `spec` (None for "none": no checkpoint at all)."""
    keep = check(spec)
    if keep is None:
        return None
    if not keep:
        return jax.checkpoint_policies.nothing_saveable
    if spec.startswith("offload"):
        if not any(m.kind == HOST for m in jax.devices()[0].addressable_memories()):
            raise ValueError(
                f"remat={spec!r}: the {jax.default_backend()} backend has no {HOST} memory to "
                "offload to; use 'tensors' or 'save:NAME,...'"
            )
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(),
            names_which_can_be_offloaded=keep,
            offload_src="device",
            offload_dst=HOST,
        )
    return jax.checkpoint_policies.save_only_these_names(*keep)


def wrap(fn: Callable, spec: str, *, in_scan: bool) -> Callable:
    """`fn` (arguments may be NNX modules) under the policy; unchanged for "none".
    `in_scan`: the call is a scan body, where XLA cannot CSE across iterations, so the
    CSE barrier is not needed (JAX's advice for checkpoint inside scan)."""
    p = policy(spec)
    if p is None:
        return fn
    return nnx.remat(fn, policy=p, prevent_cse=not in_scan)
