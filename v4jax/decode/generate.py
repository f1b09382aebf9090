"""Generation: prefill the prompts, then a `jax.lax.while_loop` of decode steps (or a Python
loop that yields tokens as they come), stopping on EOS or length, per sequence.

`speculative="mtp"` replaces the one-token steps with MTP draft + verify steps
(`v4jax.decode.speculative`); the plain path below is unchanged by it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.decode import speculative as spec
from v4jax.decode.chunk import forward_chunk
from v4jax.decode.prefix import prefill_cached
from v4jax.decode.sampling import Sampling, sample
from v4jax.numerics.policy import jit

__all__ = ["Generation", "generate", "generate_stream", "pad_prompts"]

GREEDY = Sampling()


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: np.ndarray  # [B, max_new_tokens] int32, `pad_id` after a sequence stopped
    lengths: np.ndarray  # [B] generated tokens per sequence (EOS included)
    prompt_lengths: np.ndarray  # [B]
    # speculative="mtp" only (None otherwise), per sequence: drafts accepted (and emitted),
    # verify steps taken, and a histogram [B, k+1] of the verify steps that accepted 0..k
    # drafts (draft j's acceptance rate = steps with >= j accepted / verify steps).
    accepted: np.ndarray | None = None  # [B]
    verify_steps: np.ndarray | None = None  # [B]
    accept_hist: np.ndarray | None = None  # [B, k+1]

    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0):
    """Right-pads token lists -> (tokens [B, S] int32, lengths [B] int32)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    s = max(len(p) for p in prompts)
    out = np.full((len(prompts), s), pad_id, np.int32)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = p
    return out, np.array([len(p) for p in prompts], np.int32)


def _setup(model, prompts, max_new_tokens, max_len, drafts: int = 0):
    """`drafts`: positions a verify chunk reaches past the last emitted token."""
    tokens, lengths = pad_prompts(prompts)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    need = int(lengths.max()) + max_new_tokens + drafts
    cache = model.init_cache(len(prompts), max_len or need)
    if cache.max_len < need:
        what = "longest prompt + max_new_tokens" + (" + draft_tokens" if drafts else "")
        raise ValueError(f"max_len={cache.max_len} < {what} = {need}")
    return tokens, lengths, cache


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    eos_id: int | None = None,
    max_len: int | None = None,
    speculative: str | None = None,
    draft_tokens: int | None = None,
    prefix_cache=None,
) -> Generation:
    """Batched generation compiled as one `while_loop` (stops when every sequence is done).

    `speculative="mtp"`: the MTP block drafts `draft_tokens` tokens (default 1) per step and
    the main model verifies them in one chunk; greedy output equals plain greedy decoding and
    sampled output is distributed as plain sampling (`v4jax.decode.speculative`). The cache
    is sized for the draft positions (`max_len`, if given, must cover them).

    `prefix_cache`: a `v4jax.PrefixCache`; each prompt's longest cached block-aligned prefix
    is restored instead of prefilled and its new complete blocks are stored
    (`v4jax.decode.prefix`); the output is that of a cold prefill."""
    eos = model.config.eos_token_id if eos_id is None else eos_id
    if speculative is not None or draft_tokens is not None:
        k = spec.check_args(model, speculative, draft_tokens)
        _no_prefix_cache(prefix_cache)
        tokens, lengths, cache = _setup(model, prompts, max_new_tokens, max_len, k)
        st = _spec_run(model, tokens, lengths, cache, k, max_new_tokens, sampling, eos)
        hist = np.asarray(st.accept_hist)
        return Generation(
            np.asarray(st.out), np.asarray(st.n), lengths,
            np.asarray(st.accepted), np.asarray(st.verify_steps), hist,
        )  # fmt: skip
    tokens, lengths, cache = _setup(model, prompts, max_new_tokens, max_len)
    logits, cache = _prefill(model, prompts, tokens, lengths, cache, prefix_cache)
    out, n = _loop(model, logits, cache, max_new_tokens, sampling, eos)
    return Generation(np.asarray(out), np.asarray(n), lengths)


def _prefill(model, prompts, tokens, lengths, cache, prefix_cache):
    if prefix_cache is None:
        return model.prefill(tokens, cache, lengths)
    return prefill_cached(model, [list(p) for p in prompts], cache, prefix_cache)


def _no_prefix_cache(prefix_cache) -> None:
    if prefix_cache is not None:
        raise ValueError(
            "prefix_cache with speculative='mtp' is not supported yet (the MTP block's "
            "window is not stored); use one or the other"
        )


def _spec_run(model, tokens, lengths, cache, k, t, sampling, eos, oracle=None):
    args = dict(k=k, sampling=sampling, max_new=t)
    st = spec.start(model, tokens, lengths, cache, eos=eos, **args)
    return spec.run(model, st, oracle=oracle, **args)


def _loop(model, logits, cache, steps: int, s: Sampling, eos: int):
    b = logits.shape[0]
    init = (
        0,
        logits,
        cache,
        jnp.zeros((b, steps), jnp.int32),
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
    )
    _, _, _, out, _, n = _while(model.graphdef, steps, s, eos, model.state, init)
    return out, n


@jit(static_argnums=(0, 1, 2, 3))
def _while(graphdef, steps: int, s: Sampling, eos: int, state, init):
    """Decode until every sequence emitted EOS or `steps` tokens were produced."""
    key0 = jax.random.key(s.seed)

    def cond(c):
        i, _, _, _, done, _ = c[1]
        return (i < steps) & ~jnp.all(done)

    def body(c):  # the parameter state rides in the carry: NNX needs it at the loop's level
        state, (i, logits, cache, out, done, n) = c
        model = nnx.merge(graphdef, state)
        tok = sample(logits, jax.random.fold_in(key0, i), s)
        tok = jnp.where(done, 0, tok)
        out = out.at[:, i].set(tok)
        n = n + (~done).astype(jnp.int32)
        done = done | (tok == eos)
        logits, cache = forward_chunk(model, tok[:, None], cache, jnp.ones_like(tok))
        return state, (i + 1, logits, cache, out, done, n)

    return jax.lax.while_loop(cond, body, (state, init))[1]


def generate_stream(
    model,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    eos_id: int | None = None,
    max_len: int | None = None,
    speculative: str | None = None,
    draft_tokens: int | None = None,
    prefix_cache=None,
) -> Iterator[int]:
    """Yields the tokens of one prompt's continuation as they are produced (`speculative`,
    `draft_tokens`, `prefix_cache`: as in `generate`; each verify step yields its accepted run
    at once)."""
    eos = model.config.eos_token_id if eos_id is None else eos_id
    if speculative is not None or draft_tokens is not None:
        k = spec.check_args(model, speculative, draft_tokens)
        _no_prefix_cache(prefix_cache)
        yield from _spec_stream(model, prompt, max_new_tokens, max_len, sampling, eos, k)
        return
    tokens, lengths, cache = _setup(model, [prompt], max_new_tokens, max_len)
    logits, cache = _prefill(model, [prompt], tokens, lengths, cache, prefix_cache)
    key0 = jax.random.key(sampling.seed)
    for i in range(max_new_tokens):
        tok = sample(logits, jax.random.fold_in(key0, i), sampling)
        yield int(tok[0])
        if int(tok[0]) == eos or i == max_new_tokens - 1:
            return
        logits, cache = model.decode_step(tok, cache)


def _spec_stream(model, prompt, t: int, max_len, sampling: Sampling, eos: int, k: int):
    tokens, lengths, cache = _setup(model, [prompt], t, max_len, k)
    args = dict(k=k, sampling=sampling, max_new=t)
    st = spec.start(model, tokens, lengths, cache, eos=eos, **args)
    sent = 0
    while True:
        n, done = int(st.n[0]), bool(st.done[0])
        yield from np.asarray(st.out[0, sent:n]).tolist()
        if done:
            return
        sent = n
        st = spec.step(model, st, **args)[0]
