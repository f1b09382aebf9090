"""The V4 transformer: embedding -> N-stream expansion -> scanned block segments -> hc_head ->
norm -> head, and the MTP block (reference `Transformer`, `MTPBlock`).

Structurally identical layers are stacked (leading logical axis "layers") per segment of the
layer plan and run with `nnx.scan`, so compile time does not grow with depth.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sharding.constraints import constrain, gathered_param
from v4jax.config import LayerKind, ModelConfig, Segment, layer_plan
from v4jax.model import remat as rm
from v4jax.model.block import STREAMS, Block
from v4jax.model.layers import F32, Linear, RMSNorm, gathered, mm, param
from v4jax.model.mhc import HyperHead
from v4jax.numerics import Precision


class Unit(nnx.Module):
    """One repetition of a segment's unit (1 or 2 blocks)."""

    def __init__(
        self, cfg: ModelConfig, kinds: tuple[LayerKind, ...], prec: Precision, kernels: str
    ):
        self.blocks = nnx.List([Block(cfg, k, prec, kernels) for k in kinds])

    def __call__(self, x: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
        for block in self.blocks:
            x = block(x, ids)
        return x

    def forward_train(self, x: jnp.ndarray, ids: jnp.ndarray, indexer: str):
        """Streams and a tuple of the blocks' training statistics (`Block.forward_train`)."""
        stats = []
        for block in self.blocks:
            x, aux = block.forward_train(x, ids, indexer)
            stats.append(aux)
        return x, tuple(stats)


def stacked_unit(cfg: ModelConfig, seg: Segment, prec: Precision, kernels: str) -> Unit:
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(_):
        return Unit(cfg, seg.kinds, prec, kernels)

    return make(jnp.arange(seg.repeats))


@nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
def _run_stack(x: jnp.ndarray, unit: Unit, ids: jnp.ndarray) -> jnp.ndarray:
    return gathered(unit)(x, ids)  # each layer's weights gathered for use (on a mesh)


def _run_stack_train(x: jnp.ndarray, unit: Unit, ids: jnp.ndarray, indexer: str, remat: str):
    """`_run_stack` that also returns each block's statistics, stacked [repeats, ...]; each
    repeat under the rematerialisation policy `remat` (`v4jax.model.remat`)."""
    body = rm.wrap(
        lambda unit, x, ids: gathered(unit).forward_train(x, ids, indexer), remat, in_scan=True
    )

    @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=(nnx.Carry, 0))
    def run(x, unit, ids):
        return body(unit, x, ids)

    return run(x, unit, ids)


class Head(nnx.Module):
    """hc_head collapse -> norm -> float32 head (reference `ParallelHead`); shared with the MTP."""

    def __init__(self, cfg: ModelConfig):
        self.weight = param((cfg.vocab_size, cfg.dim), jnp.bfloat16, ("vocab", "embed"))

    def __call__(self, y: jnp.ndarray) -> jnp.ndarray:  # [B, S, D] normed -> [B, S, V] f32
        return mm(y.astype(F32), self.weight[...])


class MTPBlock(nnx.Module):
    """The multi-token-prediction block `mtp.0` (reference `MTPBlock`): an r = 0, non-hash block
    fed with e_proj(enorm(embed(next ids))) + h_proj(hnorm(main streams))."""

    def __init__(self, cfg: ModelConfig, prec: Precision, kernels: str):
        d = cfg.dim
        self.block = Block(cfg, LayerKind(cfg.mtp_ratios[0], False), prec, kernels)
        self.e_proj = Linear(d, d, fmt="fp8", axes=("embed", "embed_in"), prec=prec)
        self.h_proj = Linear(d, d, fmt="fp8", axes=("embed", "embed_in"), prec=prec)
        self.enorm = RMSNorm(d, cfg.norm_eps, prec)
        self.hnorm = RMSNorm(d, cfg.norm_eps, prec)
        self.norm = RMSNorm(d, cfg.norm_eps, prec)
        self.hc_head = HyperHead(cfg, prec)

    def __call__(self, streams, emb, ids, head: Head) -> jnp.ndarray:
        """streams [B, S, N, D] of the main model, emb [B, S, D] embeddings of ids -> logits."""
        return self.forward_train(streams, emb, ids, head)[0]

    def forward_train(
        self, streams, emb, ids, head: Head, indexer: str = "off", remat: str = "none", tail=0
    ):
        """`__call__` plus the block's training statistics (`Block.forward_train`; `tail`: the
        last positions left out of them)."""
        x = self.e_proj(self.enorm(emb))[:, :, None, :].astype(F32)
        x = (x + self.h_proj(self.hnorm(streams)).astype(F32)).astype(emb.dtype)
        run = rm.wrap(
            lambda blk, x, ids: blk.forward_train(x, ids, indexer, tail), remat, in_scan=False
        )
        x, aux = run(self.block, x, ids)
        return head(self.norm(self.hc_head(x))), aux


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, prec: Precision, kernels: str = "auto"):
        self.cfg, self.prec = cfg, prec
        self.embed = param((cfg.vocab_size, cfg.dim), jnp.bfloat16, ("vocab", "embed"))
        self.segments = nnx.List([stacked_unit(cfg, s, prec, kernels) for s in layer_plan(cfg)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, prec)
        self.hc_head = HyperHead(cfg, prec)
        self.head = Head(cfg)
        self.mtp = MTPBlock(cfg, prec, kernels) if cfg.num_mtp_layers else None

    def embed_tokens(self, ids: jnp.ndarray) -> jnp.ndarray:
        # on a mesh, the rows whole for the lookup (a table FSDP-split over the model dim,
        # looked up by ids split over the batch axes, made XLA replicate the activations:
        # [B, S, D] on every device)
        table = gathered_param(self.embed[...], ("vocab", "embed"), whole=("embed",))
        return table[ids].astype(self.prec.dtype)

    def streams(self, ids: jnp.ndarray) -> jnp.ndarray:
        """Final residual streams [B, S, N, D] (before hc_head) of tokens at 0 .. S-1."""
        e = self.embed_tokens(ids)
        x = jnp.broadcast_to(e[:, :, None, :], (*e.shape[:2], self.cfg.hc_mult, e.shape[-1]))
        x = constrain(x, STREAMS)
        for unit in self.segments:
            x = _run_stack(x, unit, ids)
        return x

    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        """Token ids [B, S] -> float32 logits [B, S, V] at every position."""
        logits = gathered(self.head)(self.norm(self.hc_head(self.streams(ids))))
        return constrain(logits, ("batch", "length", "vocab"))

    def forward_train(self, ids: jnp.ndarray, indexer: str = "off", remat: str = "none"):
        """One training forward of tokens ids [B, S] at 0 .. S-1 -> (logits [B, S, V] float32,
        final streams [B, S, N, D] (the MTP's input), {"segments.{s}.blocks.{j}": that block's
        statistics stacked over the segment's repeats} (`Block.forward_train`)). `remat`: the
        blocks' rematerialisation policy (`v4jax.model.remat`)."""
        rm.check(remat)
        e = self.embed_tokens(ids)
        x = jnp.broadcast_to(e[:, :, None, :], (*e.shape[:2], self.cfg.hc_mult, e.shape[-1]))
        x = constrain(x, STREAMS)
        stats = {}
        for s, unit in enumerate(self.segments):
            x, per_block = _run_stack_train(x, unit, ids, indexer, remat)
            stats.update({f"segments.{s}.blocks.{j}": a for j, a in enumerate(per_block)})
        logits = gathered(self.head)(self.norm(self.hc_head(x)))
        return constrain(logits, ("batch", "length", "vocab")), x, stats

    def mtp_forward_train(
        self, streams: jnp.ndarray, next_ids, indexer="off", remat: str = "none", tail: int = 0
    ):
        """MTP logits [B, S, V] from main streams [B, S, N, D] and next_ids [B, S] (position i
        holds token i + 1; the logits predict token i + 2), and the block's statistics (of
        all but the last `tail` positions)."""
        if self.mtp is None:
            raise ValueError("this config has no MTP block (num_mtp_layers=0)")
        emb = self.embed_tokens(next_ids)
        mtp = gathered(self.mtp)  # its weights gathered for use (on a mesh), as a scanned layer's
        head = gathered(self.head)
        return mtp.forward_train(streams, emb, next_ids, head, indexer, remat, tail)

    def mtp_logits(self, ids: jnp.ndarray, next_ids: jnp.ndarray) -> jnp.ndarray:
        """MTP logits [B, S, V]: main streams of ids, MTP fed with next_ids (ids shifted by 1)."""
        if self.mtp is None:
            raise ValueError("this config has no MTP block (num_mtp_layers=0)")
        mtp = gathered(self.mtp)
        return mtp(self.streams(ids), self.embed_tokens(next_ids), next_ids, gathered(self.head))
