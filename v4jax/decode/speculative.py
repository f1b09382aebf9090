"""MTP speculative decoding (issue 15 section 1; V3 report §5.4.3).

One verify step per sequence, all under jit with static shapes:

1. Draft. The MTP block's input at position i is (main final streams H_i, token i+1) and it
   predicts token i+2 (`Transformer.mtp_forward_train`). The state keeps, per sequence, the MTP
   rows not yet written to the MTP cache: H of the positions the last verify kept and the
   tokens after them, the last being the token just emitted. One MTP chunk writes those rows
   (they are final: main streams and emitted tokens) and its last position's logits give
   draft 1. Drafts 2..k chain the block on its own output streams and the previous draft, on a
   copy of the MTP cache that is then dropped (its rows mix in drafts).
2. Verify. The main model runs [emitted token, draft 1..k] as one chunk of k + 1 tokens
   (`verify.verify_forward`, cache untouched) -> logits at each position.
3. Accept the longest agreeing prefix a (`accept`), emit a + 1 tokens (cut at EOS or at
   max_new_tokens), and commit exactly the tokens kept to the main cache (`verify.commit`).
   The MTP rows of the kept positions become the next step's pending rows.

Invariant between steps, per sequence: the main cache holds prompt + emitted[:-1] (the last
emitted token is pending), so it ends exactly as plain decoding leaves it; the MTP cache holds
the rows of every position before the pending ones. A finished sequence keeps running with
zero-length commits (static shapes) and leaves its caches as they are.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.decode import verify as vf
from v4jax.decode.accept import greedy_accept, probs, propose, sample_accept
from v4jax.decode.cache import DecodeCache, LayerCache
from v4jax.decode.sampling import Sampling, sample
from v4jax.numerics.policy import jit

__all__ = ["SpecState", "check_args", "run", "start", "step"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecState:
    """The speculative decode state (k = draft tokens, T = max_new_tokens)."""

    cache: DecodeCache  # main model: prompt + emitted[:-1] of each sequence
    mtp: LayerCache  # the MTP block's window ring: rows of positions < mtp_pos
    mtp_pos: jax.Array  # [B] int32
    pend_h: jax.Array  # [B, k+1, N, D] main streams of the pending MTP rows (mtp_pos + i)
    pend_tok: jax.Array  # [B, k+1] int32 token after each pending row; the last = emitted[-1]
    pend_n: jax.Array  # [B] int32 pending rows (>= 1)
    out: jax.Array  # [B, T] int32 emitted tokens, 0 after a sequence stopped
    n: jax.Array  # [B] int32 emitted tokens
    done: jax.Array  # [B] bool
    accepted: jax.Array  # [B] int32 drafts accepted and emitted
    verify_steps: jax.Array  # [B] int32 verify steps taken while running
    accept_hist: jax.Array  # [B, k+1] int32 verify steps that accepted 0..k drafts
    it: jax.Array  # [] int32 verify steps run (all sequences)
    eos: jax.Array  # [] int32


def check_args(model, speculative, draft_tokens) -> int:
    """-> k; one-line errors for an unknown method, a bad k or a model without MTP block."""
    if speculative is None:
        raise ValueError(f"draft_tokens={draft_tokens!r} needs speculative='mtp'")
    if speculative != "mtp":
        raise ValueError(f"speculative={speculative!r}: expected None or 'mtp'")
    k = 1 if draft_tokens is None else draft_tokens
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"draft_tokens={draft_tokens!r}: must be an int >= 1")
    if model.config.num_mtp_layers == 0:
        raise ValueError("speculative='mtp' needs an MTP block (config num_mtp_layers=0)")
    return k


def _last(x, n):
    """x [B, S, ...], n [B] -> x at index n - 1, keeping the axis: [B, 1, ...]."""
    idx = jnp.maximum(n - 1, 0).reshape(-1, *[1] * (x.ndim - 1))
    return jnp.take_along_axis(x, idx, axis=1)


def _start(model, tokens, lengths, cache: DecodeCache, k: int, s: Sampling, t: int, eos):
    """Prefill: the main cache, the first token (as plain `generate` samples it), the MTP
    cache over the prompt's known rows (positions 0 .. P-2) and the pending row P-1."""
    b = tokens.shape[0]
    x, cache = vf.forward_streams(model, tokens, cache, lengths)
    key = jax.random.fold_in(jax.random.key(s.seed), 0)  # plain generate's first-token key
    tok = sample(vf.last_logits(model, x, lengths), key, s)
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    w, kd = model.cfg.window_size, model.cfg.head_dim
    mtp = LayerCache(jnp.zeros((b, w, kd), cache.layers[0][0].window.dtype))
    zero = jnp.zeros((b,), jnp.int32)
    _, mtp = vf.mtp_chunk(model, x, nxt, mtp, zero, lengths - 1)
    pend_h = jnp.zeros((b, k + 1, *x.shape[2:]), x.dtype).at[:, :1].set(_last(x, lengths))
    done = (tok == eos) | (t <= 1)
    return SpecState(
        cache=cache,
        mtp=mtp,
        mtp_pos=lengths - 1,
        pend_h=pend_h,
        pend_tok=jnp.zeros((b, k + 1), jnp.int32).at[:, 0].set(tok),
        pend_n=jnp.ones((b,), jnp.int32),
        out=jnp.zeros((b, t), jnp.int32).at[:, 0].set(tok),
        n=jnp.ones((b,), jnp.int32),
        done=done,
        accepted=zero,
        verify_steps=zero,
        accept_hist=jnp.zeros((b, k + 1), jnp.int32),
        it=jnp.zeros((), jnp.int32),
        eos=jnp.asarray(eos, jnp.int32),
    )


def _draft(model, st: SpecState, k: int, s: Sampling, key, oracle):
    """-> drafts [B, k], their distributions q [B, k, V] (None if greedy), MTP logits
    [B, k, V], the MTP cache with the pending rows written, the next MTP position."""
    n = jnp.where(st.done, 0, st.pend_n)
    x, mtp = vf.mtp_chunk(model, st.pend_h, st.pend_tok, st.mtp, st.mtp_pos, n)
    g, pos, scratch = _last(x, st.pend_n), st.mtp_pos + n, mtp
    ones = jnp.ones_like(n)
    drafts, qs, logits = [], [], []
    for j in range(k):
        if j:  # chain: own output streams at the previous position + the previous draft
            g, scratch = vf.mtp_chunk(model, g, drafts[-1][:, None], scratch, pos + j - 1, ones)
        lg = vf.mtp_head(model, g)[:, 0]  # [B, V]
        d, q = propose(lg, jax.random.fold_in(key, j), s)
        if oracle is not None:  # test hook: drafts from a token table (-1: the MTP's)
            col = jnp.minimum(st.n + j, oracle.shape[1] - 1)
            o = jnp.take_along_axis(oracle, col[:, None], axis=1)[:, 0]
            d = jnp.where(o >= 0, o, d)
            if q is not None:  # a deterministic draft: q = one-hot
                q = jnp.where((o >= 0)[:, None], jax.nn.one_hot(o, q.shape[-1]), q)
        drafts.append(d)
        qs.append(q)
        logits.append(lg)
    q = None if qs[0] is None else jnp.stack(qs, axis=1)
    return jnp.stack(drafts, axis=1), q, jnp.stack(logits, axis=1), mtp, pos


def _emit(st: SpecState, a, emitted, t: int):
    """Accepted a [B], candidate tokens [B, k+1] -> tokens emitted this step m [B] (cut at EOS
    and at t tokens; 0 once done) and the bookkeeping fields of the new state."""
    b, k1 = emitted.shape
    i = jnp.arange(k1)[None, :]
    m = jnp.minimum(a + 1, t - st.n)
    eos = (emitted == st.eos) & (i < m[:, None])
    hit = jnp.any(eos, axis=1)
    m = jnp.where(hit, jnp.argmax(eos, axis=1) + 1, m)
    run = ~st.done
    m = jnp.where(run, m, 0)
    col = jnp.where(i < m[:, None], st.n[:, None] + i, t)  # t: dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], col.shape)
    n = st.n + m
    fields = dict(
        out=st.out.at[rows, col].set(emitted, mode="drop"),
        n=n,
        done=st.done | (run & hit) | (n >= t),
        accepted=st.accepted + jnp.minimum(a, m),
        verify_steps=st.verify_steps + run,
        accept_hist=st.accept_hist.at[jnp.arange(b), a].add(run.astype(jnp.int32)),
    )
    return m, fields


def _step(model, st: SpecState, k: int, s: Sampling, t: int, oracle):
    """One draft + verify + accept + commit step -> (new state, info for tests)."""
    key = jax.random.fold_in(jax.random.key(s.seed), 1 + st.it)
    kd, ka = jax.random.split(key)
    drafts, q, draft_logits, mtp, mtp_pos = _draft(model, st, k, s, kd, oracle)
    last = jnp.take_along_axis(st.pend_tok, (st.pend_n - 1)[:, None], axis=1)  # [B, 1]
    x, us = vf.verify_forward(model, jnp.concatenate([last, drafts], axis=1), st.cache)
    logits = vf.stream_logits(model, x)  # [B, k+1, V]
    if s.temperature == 0.0:
        a, emitted = greedy_accept(drafts, logits)
    else:
        a, emitted = sample_accept(drafts, q, probs(logits, s), ka)
    m, fields = _emit(st, a, emitted, t)
    new = dataclasses.replace(
        st,
        cache=vf.commit(model, st.cache, us, m),
        mtp=mtp,
        mtp_pos=mtp_pos,
        pend_h=jnp.where(st.done[:, None, None, None], st.pend_h, x),
        pend_tok=jnp.where(st.done[:, None], st.pend_tok, emitted),
        pend_n=jnp.where(st.done, st.pend_n, m),
        it=st.it + 1,
        **fields,
    )
    info = dict(drafts=drafts, draft_logits=draft_logits, logits=logits, accepted=a)
    return new, info


@jit(static_argnums=(0, 1, 2, 3))
def _start_jit(graphdef, k, s, t, params, tokens, lengths, cache, eos):
    return _start(nnx.merge(graphdef, params), tokens, lengths, cache, k, s, t, eos)


@jit(static_argnums=(0, 1, 2, 3))
def _step_jit(graphdef, k, s, t, params, st, oracle):
    return _step(nnx.merge(graphdef, params), st, k, s, t, oracle)


@jit(static_argnums=(0, 1, 2, 3))
def _loop_jit(graphdef, k, s, t, params, st, oracle):
    """Verify steps until every sequence stopped (each step emits >= 1 token per running
    sequence, so at most t - 1 steps)."""

    def cond(c):
        st = c[1]
        return (st.it < t) & ~jnp.all(st.done)

    def body(c):  # the parameter state rides in the carry, as in `generate._while`
        params, st = c
        return params, _step(nnx.merge(graphdef, params), st, k, s, t, oracle)[0]

    return jax.lax.while_loop(cond, body, (params, st))[1]


def start(model, tokens, lengths, cache, *, k: int, sampling: Sampling, max_new: int, eos: int):
    """Prefill right-padded prompts [B, S] (lengths [B]) into an empty `cache` sized for
    prompt + max_new + k -> the first `SpecState` (one token emitted per sequence)."""
    args = (jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32), cache, eos)
    return _start_jit(model.graphdef, k, sampling, max_new, model.state, *args)


def step(model, st: SpecState, *, k: int, sampling: Sampling, max_new: int, oracle=None):
    """One verify step -> (state, info: drafts [B, k], draft_logits [B, k, V], verify logits
    [B, k+1, V], accepted [B]). `oracle` [B, W] int32 (tests): draft j (from 0) of a sequence
    that emitted n tokens is oracle[b, min(n + j, W - 1)] where that is >= 0, else the MTP's."""
    return _step_jit(model.graphdef, k, sampling, max_new, model.state, st, oracle)


def run(model, st: SpecState, *, k: int, sampling: Sampling, max_new: int, oracle=None):
    """Verify steps in one `while_loop` until every sequence stopped -> the final state."""
    return _loop_jit(model.graphdef, k, sampling, max_new, model.state, st, oracle)
