"""Automatic prefix caching for `generate` (issue 15 §2; V4 report §3.6, on-disk KV cache).

Keys. A prompt is cut into blocks of `block_tokens` tokens (a multiple of every compression
ratio: 128 for the presets, so a block ends where every layer's compressed entries are
complete; engines whose block was the LCM of larger sizes got 0% hits below it). Block i's
key is a chain hash sha256(key of block i-1 | tokens of block i), rooted in a fingerprint of
the model (config, numerics, cache dtype, a device checksum of every weight), so a key names
one model's cache content for one exact token prefix at one absolute position.

What a block stores (the report's split between the paged KV and the per-request state):
- always, the block's compressed entries: its r = 4 CSA entries and indexer keys and its
  r = 128 HCA entry, every layer;
- at some block ends, the state a decode needs to resume there: every layer's sliding-window
  ring and the compressors' pending rows (the r = 4 overlap keeps the previous block's raw
  projections, 4 rows; the r = 128 compressor is empty at a block end). The ring is stored
  as it is in the cache: its slots are a function of the absolute position, which the key
  fixes.

Sliding-window policy. The report names three: store the window at every block ("full"),
checkpoint it every p tokens, or store none and recompute the last window of tokens of every
layer (128 x 43 = 5,504 tokens for Flash). v4jax checkpoints: the state is stored every
`window_every` tokens (default: every block, i.e. full caching) and always at the last
complete block of each request, so a repeated request, a shared system prompt and the next
turn of a conversation all resume at their last complete block. Restoring reads the
compressed entries of every matched block and one state; the tokens after the restore point
are prefilled as usual. Recompute-only was not chosen: it makes every hit pay 128 x layers
tokens of prefill and, for prefixes shorter than that, no hit at all. `scripts/bench_decode.py
--section prefix` measures bytes per token and warm time to first token for both checkpoint
spacings.

Exactness: a restored cache holds the same arrays a cold prefill of the prefix wrote, and the
suffix is prefilled by the same chunked path (`forward_chunk` from any position), so logits
match a cold prefill to the chunked-prefill tolerance (bitwise where chunking is).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.config import layer_plan, to_dict
from v4jax.decode.cache import DecodeCache
from v4jax.decode.prefix_pack import pack, unpack
from v4jax.decode.prefix_store import PrefixCache
from v4jax.numerics.checksum import checksums

__all__ = ["block_size", "chain_keys", "model_root", "prefill_cached"]

FORMAT = 1


def block_size(cfg, requested: int | None = None) -> int:
    """The hashed block length: a multiple of every compression ratio (the indexer's too)."""
    ratios = [int(r) for r in cfg.compress_ratios if int(r)]
    lcm = math.lcm(*ratios) if ratios else 1
    if requested is None:
        return lcm * -(-128 // lcm)
    if requested % lcm:
        raise ValueError(
            f"block_tokens={requested}: must be a multiple of every compression ratio "
            f"(lcm {lcm}), so that a block ends where all compressed entries are complete"
        )
    return requested


def model_root(model, pc: PrefixCache, blk: int) -> bytes:
    """Root of the key chain: config, numerics, cache dtype, block length, weight checksums.
    Computed once per set of weight arrays (jax arrays are immutable: the same objects mean
    the same weights)."""
    leaves = [x for x in jax.tree.leaves(model.state) if isinstance(x, jax.Array)]
    for refs, root in pc._fingerprints:
        if len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves, strict=True)):
            return root
    meta = {
        "format": FORMAT,
        "config": to_dict(model.config),
        "numerics": model.precision.numerics.value,
        "dtype": str(jnp.dtype(model.precision.dtype)),
        "block": blk,
    }
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    h.update(np.asarray(checksums(leaves)).astype("<u4").tobytes())
    root = h.digest()
    pc._fingerprints[:] = [([weakref.ref(x) for x in leaves], root)]
    return root


def chain_keys(root: bytes, tokens: Sequence[int], blk: int, n: int) -> list[str]:
    """Hex keys of the first `n` blocks of `tokens`."""
    ids = np.asarray(tokens, "<i4")
    keys, h = [], root
    for i in range(n):
        h = hashlib.sha256(h + ids[i * blk : (i + 1) * blk].tobytes()).digest()
        keys.append(h.hex())
    return keys


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Which cache leaves (in `jax.tree.leaves(cache)` order) a record holds."""

    pos: int  # index of DecodeCache.pos
    block: list[tuple[int, int]]  # (leaf index, ratio): entries / indexer keys, by position
    # window rings (rows None: whole) and compressor states (rows: the leading rows that are
    # present at a block end, (kept blocks - 1) x r: 4 for the overlapping r = 4, 0 for
    # r = 128; the other rows are absent, as in a fresh cache)
    state: list[tuple[int, int | None]]

    def check(self, rec: list[np.ndarray], leaves, blk: int) -> bool:
        """Shapes and dtypes of a record against this cache (False: foreign record)."""
        want = [(leaves[i].shape[:1] + (blk // r,) + leaves[i].shape[3:], leaves[i].dtype)
                for i, r in self.block]  # fmt: skip
        if len(rec) == len(self.block) + len(self.state):
            want += [(leaves[i].shape[:1] + _rows(leaves[i].shape[2:], n), leaves[i].dtype)
                     for i, n in self.state]  # fmt: skip
        elif len(rec) != len(self.block):
            return False
        return all(a.shape == s and a.dtype == d for a, (s, d) in zip(rec, want, strict=True))


def _layout(model, cache: DecodeCache) -> _Layout:
    plan = layer_plan(model.config)
    pos, block, state = -1, [], []
    for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(cache)[0]):
        names = [getattr(p, "name", getattr(p, "idx", None)) for p in path]
        if names[0] == "pos":
            pos = i
        elif names[3] in ("entries", "index_keys"):
            block.append((i, int(plan[names[1]].kinds[names[2]].attn)))
        elif names[3] in ("compressor", "index_compressor"):
            r = int(plan[names[1]].kinds[names[2]].attn)
            state.append((i, r if r == 4 else 0))  # the r = 4 compressors overlap
        else:
            state.append((i, None))
    return _Layout(pos, block, state)


def _rows(shape: tuple, n: int | None) -> tuple:
    return shape if n is None else (n, *shape[1:])


def _state(host: list[np.ndarray], lay: _Layout, b: int) -> list[np.ndarray]:
    """Sequence b's decode state at a block end from the state leaves (host copies)."""
    rows = [n for _, n in lay.state]
    return [h[:, b] if n is None else h[:, b, :n] for h, n in zip(host, rows, strict=True)]


def _lookup(pc: PrefixCache, keys: list[str], lay: _Layout, leaves, blk: int) -> list:
    """Records of the longest cached run of `keys` that ends with a stored state."""
    recs = []
    for k in keys:
        rec = pc.get(k)
        rec = None if rec is None else unpack(rec)
        if rec is not None and not lay.check(rec, leaves, blk):
            pc.discard(k)
            rec = None
        if rec is None:
            break
        recs.append(rec)
    with_state = [i for i, r in enumerate(recs) if len(r) > len(lay.block)]
    return recs[: with_state[-1] + 1] if with_state else []


def _restore(cache: DecodeCache, found: list[list], lay: _Layout, blk: int) -> DecodeCache:
    leaves, tree = jax.tree.flatten(cache)
    host = [np.array(x) for x in leaves]
    for b, recs in enumerate(found):
        for k, rec in enumerate(recs):
            for (i, r), a in zip(lay.block, rec, strict=False):
                host[i][:, b, k * blk // r : (k + 1) * blk // r] = a
        if recs:
            for (i, _), a in zip(lay.state, recs[-1][len(lay.block) :], strict=True):
                host[i][:, b, : a.shape[1]] = a
            host[lay.pos][b] = len(recs) * blk
    new = jax.tree.unflatten(tree, [jnp.asarray(h) for h in host])
    return dataclasses.replace(new, host_pos=host[lay.pos].astype(np.int32))


def prefill_cached(model, prompts: Sequence[Sequence[int]], cache: DecodeCache, pc: PrefixCache):
    """`model.prefill` of a batch of prompts into a fresh cache, with the longest cached
    block-aligned prefix of each restored instead of computed, and its new complete blocks
    stored -> (logits of each prompt's last token [B, V], cache)."""
    if not isinstance(pc, PrefixCache):
        raise TypeError(f"prefix_cache must be a v4jax.PrefixCache, got {type(pc).__name__}")
    if cache.host_pos is None or cache.host_pos.any():
        raise ValueError("prefill_cached needs a fresh cache (every position 0)")
    blk = block_size(model.config, pc.block_tokens)
    every = pc.window_every or blk
    if every % blk:
        raise ValueError(f"window_every={every}: must be a multiple of block_tokens={blk}")
    root = model_root(model, pc, blk)
    lay, leaves = _layout(model, cache), jax.tree.leaves(cache)
    lens = [len(p) for p in prompts]
    keys = [chain_keys(root, p, blk, n // blk) for p, n in zip(prompts, lens, strict=True)]
    found = [
        _lookup(pc, k[: (n - 1) // blk], lay, leaves, blk) for k, n in zip(keys, lens, strict=True)
    ]
    start = [len(f) * blk for f in found]
    pc.count(
        lookups=len(prompts),
        hit_requests=sum(s > 0 for s in start),
        hit_tokens=sum(start),
        prefill_tokens=sum(lens) - sum(start),
    )
    if any(start):
        cache = _restore(cache, found, lay, blk)
    stops = [_stops(st, n // blk * blk, every) for st, n in zip(start, lens, strict=True)]
    logits, cache, states = _prefill_chunks(model, prompts, cache, start, stops, every, lay)
    dims = (model.config.head_dim, model.config.rope_head_dim) if pc.compact else None
    _store(pc, cache, keys, start, stops, states, lay, blk, dims)
    return logits, cache


def _stops(start: int, last: int, every: int) -> list[int]:
    """Where a sequence restored at `start` pauses to copy its state: multiples of `every`
    and its last complete block end `last` (none if no new complete block)."""
    if last <= start:
        return []
    return sorted(set(range(start + every - start % every, last, every)) | {last})


def _prefill_chunks(model, prompts, cache, start, stops, every, lay):
    """Prefills every prompt from its restore point, pausing each sequence at its stops (all
    at block ends) to copy the state there -> (last-token logits, cache, {(b, pos): state})."""
    b_n = len(prompts)
    pos, logits, states = list(start), None, {}
    lens = [len(p) for p in prompts]
    while any(p < n for p, n in zip(pos, lens, strict=True)):
        ends = [
            next((s for s in st if s > p), n) for p, st, n in zip(pos, stops, lens, strict=True)
        ]
        n_b = [e - p for e, p in zip(ends, pos, strict=True)]
        # `every` while a sequence has a stop ahead, else the tails (< one block): padded to a
        # power of two, so that a conversation's turns reuse a few compiled chunk widths
        tail = not any(st and st[-1] > p for st, p in zip(stops, pos, strict=True))
        width = min(every, max(16, 1 << (max(n_b) - 1).bit_length())) if tail else every
        tokens = np.zeros((b_n, width), np.int32)
        for b, (p, n) in enumerate(zip(pos, n_b, strict=True)):
            tokens[b, :n] = prompts[b][p : p + n]
        out, cache = model.prefill(tokens, cache, np.asarray(n_b, np.int32))
        moved = jnp.asarray(np.asarray(n_b) > 0)[:, None]
        logits = out if logits is None else jnp.where(moved, out, logits)
        pos = ends
        snap = [b for b in range(b_n) if n_b[b] and pos[b] in stops[b]]
        if snap:
            leaves = jax.tree.leaves(cache)
            host = [np.asarray(leaves[i]) for i, _ in lay.state]
            for b in snap:
                states[(b, pos[b])] = _state(host, lay, b)
    return logits, cache, states


def _store(pc, cache, keys, start, stops, states, lay, blk, dims):
    """Writes each prompt's new complete blocks: entries always, the state where copied."""
    if not any(stops):
        return
    leaves = jax.tree.leaves(cache)
    host = {i: np.asarray(leaves[i]) for i, _ in lay.block}
    for b, (st, ks) in enumerate(zip(start, keys, strict=True)):
        for k in range(st // blk, len(ks)):
            rec = [host[i][:, b, k * blk // r : (k + 1) * blk // r] for i, r in lay.block]
            state = states.get((b, (k + 1) * blk))
            if state is not None:
                rec = rec + state
            elif pc.has(ks[k]):
                continue
            pc.put(ks[k], rec if dims is None else pack(rec, *dims), replace=state is not None)
