"""Logical -> mesh axis rules: one table per regime (README, "Sharding").

Mesh axes (the only ones; add one only when a regime needs it):
  data    pure data parallelism: batch rows; parameters replicated.
  fsdp    data parallelism whose ranks also split the parameters' model dim (gathered per use).
  expert  expert parallelism: routed experts split; outside the MoE it is another batch axis
          (TRAIN) or another tensor-parallel axis (DECODE).
  context context parallelism (TRAIN): the sequence split into contiguous shards; attention
          exchanges only boundary tokens and compressed entries (v4jax/model/context_parallel.py);
          parameters are ZeRO-split over it like fsdp.
  tensor  tensor parallelism: attention heads, the grouped output projection, FFN width, vocab.

A rule maps a logical name to a tuple of mesh axes, tried in order. Resolution (`specs.resolve`)
skips an axis the mesh lacks, an axis already used by an earlier dim of the same array, and an
axis that would no longer divide the dim; so any mesh works with any table, and a dim that
cannot be split stays whole. Parameters and activations have separate tables because the same
name shards differently (e.g. a weight's "embed" dim is FSDP-split, the activations' is not).

Parameter names are those of `v4jax/model` (layers.py docstring); activation names are the few
the model passes to `sharding.constraints.constrain` / the MoE's expert-parallel `shard_map`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

__all__ = ["AXES", "DECODE", "TRAIN", "Regime", "Rules", "rules_for"]

AXES = ("data", "fsdp", "context", "expert", "tensor")

Rule = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rules:
    """A regime's rules: logical name -> mesh axes, for parameters and for activations."""

    name: str
    params: Mapping[str, Rule]
    activations: Mapping[str, Rule]
    # ZeRO: after the table, each parameter is also split over each of these mesh axes that
    # it does not use yet, on a dim that still divides (`specs.zero_fill`), so no mesh axis
    # but the pure-replica `data` axis holds two copies of anything it could split.
    zero: Rule = ()

    def __post_init__(self) -> None:
        for table in (self.params, self.activations, {"zero": self.zero}):
            for logical, axes in table.items():
                bad = [a for a in axes if a not in AXES]
                if bad:
                    raise ValueError(f"{self.name} rule {logical!r}: unknown mesh axes {bad}")

    def __hash__(self) -> int:  # usable as a jit cache key
        return hash(
            (self.name, tuple(self.params.items()), tuple(self.activations.items()), self.zero)
        )


# Training / fine-tuning: FSDP + expert parallelism + tensor parallelism, batch over every
# data-like axis (expert ranks are data-parallel outside the MoE, as in DeepSeek's DP attention).
# The table places each weight for its matmul; `zero` then splits what the table left whole over
# the remaining model axes (e.g. wq_b's q_lora dim over fsdp and expert: ZeRO-3, gathered per use).
TRAIN = Rules(
    name="TRAIN",
    zero=("fsdp", "context", "expert", "tensor"),
    params={
        "layers": (),  # the scanned stack: every rank holds its slice of every layer
        "vocab": ("tensor",),  # embedding / head rows, tid2eid rows
        "embed": ("fsdp",),  # the model dim of every weight: the FSDP split
        "embed_in": ("tensor",),  # MTP e_proj / h_proj input dim (their "embed" is FSDP)
        "q_lora": (),  # query latent (1024 / 1536): small, kept whole
        "heads": ("tensor",),  # wq_b rows (H * K) and the per-head sinks: Megatron column split
        "kv": (),  # the single shared K = V head and the compressors' width
        "o_lora": ("tensor",),  # grouped output projection ranks: groups follow the heads
        "o_in": (),  # within-group input of wo_a (its groups are already split)
        "experts": ("expert", "tensor"),  # routed experts: whole experts over model-parallel ranks
        "mlp": ("tensor",),  # shared-expert width (routed experts: dim 0 took "tensor")
        "index": ("tensor",),  # lightning-indexer heads
        "hc_mix": (),  # mHC mixing rows ((2 + n) n = 24): tiny
        "hc": (),  # mHC head rows (n = 4): tiny
        "ratio": (),  # compressor position biases (4 / 128 rows): tiny
    },
    activations={
        "batch": ("data", "fsdp", "expert"),  # batch rows over every data-like axis
        "length": ("context",),  # sequence: contiguous shards (context parallelism)
        "heads": ("tensor",),  # attention heads (the attention core's shard_map)
        "embed": (),  # residual / hidden width: whole (FSDP gathers weights, not activations)
        "vocab": ("tensor",),  # logits columns, as the head's rows
        "experts": ("expert", "tensor"),  # the MoE's expert dim inside its shard_map (= params)
    },
)

# Serving (forward, prefill, decode): weights stationary, no FSDP gathers. With no tensor axis
# the expert axis also serves as the tensor-parallel axis, so a plain 'expert=8' mesh splits
# every large weight 8 ways (attention TP8 + MoE EP8, the usual layout on one 8-GPU host).
DECODE = Rules(
    name="DECODE",
    params={
        "layers": (),  # the scanned stack: every rank holds its slice of every layer
        "vocab": ("tensor", "expert"),  # embedding / head rows over all model-parallel ranks
        "embed": (),  # model dim whole: no per-step weight gathers
        "embed_in": (),  # MTP e_proj / h_proj input: whole (their "embed" is whole too)
        "q_lora": (),  # query latent: small, kept whole
        "heads": ("tensor", "expert"),  # wq_b rows and sinks: head-parallel attention
        "kv": (),  # the single shared K = V head: replicated, as the KV cache is per head
        "o_lora": ("tensor", "expert"),  # grouped output projection ranks, with the heads
        "o_in": (),  # within-group input of wo_a
        "experts": ("expert", "tensor"),  # routed experts: whole experts over model-parallel ranks
        "mlp": ("tensor", "expert"),  # shared-expert width (routed experts: dim 0 took both)
        "index": ("tensor", "expert"),  # lightning-indexer heads
        "hc_mix": (),  # mHC mixing rows: tiny
        "hc": (),  # mHC head rows: tiny
        "ratio": (),  # compressor position biases: tiny
    },
    activations={
        "batch": ("data", "fsdp"),  # batch rows: data-parallel replicas of the model
        "length": (),  # sequence: whole
        "heads": ("tensor", "expert"),  # head-parallel attention core (as the params' heads)
        "embed": (),  # residual / hidden width: whole
        "vocab": ("tensor", "expert"),  # logits columns, as the head's rows
        "experts": ("expert", "tensor"),  # the MoE's expert dim inside its shard_map (= params)
    },
)


class Regime(enum.Enum):
    TRAIN = "train"
    DECODE = "decode"


def rules_for(regime: Regime | str | Rules) -> Rules:
    """The table of a regime ("train" / "decode"); a `Rules` passes through."""
    if isinstance(regime, Rules):
        return regime
    try:
        r = Regime(regime) if isinstance(regime, str) else regime
    except ValueError:
        raise ValueError(f"regime={regime!r}: expected 'train' or 'decode'") from None
    return TRAIN if r is Regime.TRAIN else DECODE
