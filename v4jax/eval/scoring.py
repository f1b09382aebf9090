"""The log-likelihood primitive: sum log p(continuation | context) under `jit`, in buckets.

A `Request` is scored by running the model on `context + continuation[:-1]` at positions
0 .. L-1 and reading the log-probabilities of the continuation tokens. Requests are sorted by
length (longest first, as lm-evaluation-harness does, so a batch that does not fit in memory
fails at once), assigned to the smallest bucket length >= L and padded on the right to
[batch_size, bucket]; the last batch of a bucket is filled with padding rows. So the model
and the scoring step see at most one shape per bucket and compile once per bucket.

Sequences are padded, never packed: the model has no document mask, so two documents packed in
one row would attend to each other. Right padding cannot change a row's scores (attention is
causal and no layer mixes tokens across rows or from the future), and for a fixed
[batch_size, bucket] shape the scores of a request are bitwise independent of the other rows
and of the padding. Between different shapes (another batch size or bucket) they agree to
float32 rounding only: XLA's CPU code generation for fused reductions depends on the array
shape (e.g. the per-head RMS of the queries over 128 values rounds differently at
[1, 100, 4, 128] and [1, 104, 4, 128]), so the last bits of the logits move by ~1e-7 relative.

Compilations are observable: `Scorer.stats.compilations` counts the XLA compilations made
while scoring (`jax.monitoring` backend-compile events) and `step_traces` the traces of the
scoring step (one per distinct [batch_size, bucket] shape).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Loglik", "Request", "Scorer", "ScorerStats", "default_buckets"]

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_counts = {"compiles": 0, "compile_seconds": 0.0, "traces": 0}
_listener_lock = threading.Lock()
_listening = False


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == _COMPILE_EVENT:
        _counts["compiles"] += 1
        _counts["compile_seconds"] += duration


def _listen() -> None:
    global _listening
    with _listener_lock:
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            _listening = True


@dataclasses.dataclass(frozen=True, eq=False)
class Request:
    """Score `continuation` given `context` (token ids, both non-empty)."""

    context: np.ndarray  # [C] int32
    continuation: np.ndarray  # [T] int32

    def __post_init__(self) -> None:
        for name in ("context", "continuation"):
            a = np.asarray(getattr(self, name))
            if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{name}: expected a non-empty list of token ids, got {a!r}")
            object.__setattr__(self, name, a.astype(np.int32))

    @property
    def input_len(self) -> int:
        """Length of the model input: context + continuation minus the last token."""
        return len(self.context) + len(self.continuation) - 1


@dataclasses.dataclass(frozen=True)
class Loglik:
    """Score of one request."""

    logprob: float  # sum over the continuation of log p(token | prefix), natural log
    num_tokens: int  # continuation length
    greedy: bool  # every continuation token is the argmax: greedy decoding would produce it


@dataclasses.dataclass
class ScorerStats:
    """Running counters of a `Scorer` (mutable; results themselves are frozen)."""

    compilations: int = 0  # XLA compilations while scoring (all functions)
    compile_seconds: float = 0.0  # time spent in those compilations
    step_traces: int = 0  # traces of the scoring step = distinct [batch, bucket] shapes seen
    batches: int = 0
    tokens: int = 0  # real (non-padding) model input tokens
    padded_tokens: int = 0  # batch_size * bucket summed over batches
    seconds: float = 0.0  # wall time inside `loglikelihood`
    shapes: set[tuple[int, int]] = dataclasses.field(default_factory=set)

    @property
    def tokens_per_second(self) -> float:
        """Real input tokens per second of scoring, compilation time excluded."""
        run = self.seconds - self.compile_seconds
        return self.tokens / run if run > 0 else 0.0


def default_buckets(max_len: int, *, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest` below `max_len`, then `max_len` itself."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return (*out, max_len)


@jax.jit
def _token_scores(logits: jax.Array, targets: jax.Array):
    """logits [B, S, V] float32, targets [B, S] -> log p(target) [B, S], argmax == target."""
    _counts["traces"] += 1  # runs once per trace, i.e. once per compiled shape
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - lse, jnp.argmax(logits, axis=-1) == targets


class Scorer:
    """Scores `Request`s with a model in fixed [batch_size, bucket] shapes.

    `max_len`: the longest model input (context + continuation - 1); at most the model's
    `max_position_embeddings` (default: 2048, or that limit if smaller). `buckets`: the
    padded lengths (default `default_buckets`); `max_len` is added if missing. `pad_id`: the
    token of padding positions (never scored).
    """

    def __init__(
        self,
        model,
        *,
        max_len: int | None = None,
        batch_size: int = 8,
        buckets: Sequence[int] | None = None,
        pad_id: int = 0,
    ):
        cfg = model.config
        max_len = min(2048, cfg.max_position_embeddings) if max_len is None else max_len
        if not 1 <= max_len <= cfg.max_position_embeddings:
            raise ValueError(
                f"max_len={max_len}: must be in [1, {cfg.max_position_embeddings}] "
                "(the model's max_position_embeddings)"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        bs = sorted(set(int(b) for b in (buckets or default_buckets(max_len))) | {max_len})
        if bs[0] < 1 or bs[-1] > max_len:
            raise ValueError(f"buckets {bs}: must lie in [1, max_len={max_len}]")
        if not 0 <= pad_id < cfg.vocab_size:
            raise ValueError(f"pad_id={pad_id}: outside the vocabulary [0, {cfg.vocab_size})")
        self.model, self.max_len, self.batch_size = model, max_len, batch_size
        self.buckets, self.pad_id = tuple(bs), pad_id
        self.stats = ScorerStats()
        _listen()

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def loglikelihood(
        self, requests: Sequence[Request], *, progress: Callable[[int, int], None] | None = None
    ) -> list[Loglik]:
        """Scores of `requests`, in their order. `progress(done, total)` is called after each
        batch with the number of requests finished so far and the number of requests."""
        lengths = np.array([self._check(i, r) for i, r in enumerate(requests)], np.int64)
        out: list[Loglik | None] = [None] * len(requests)
        t0, c0 = time.perf_counter(), dict(_counts)
        pending, done = None, 0
        for bucket, rows in _plan(lengths, self.buckets, self.batch_size):
            launched = self._launch(bucket, [requests[i] for i in rows]), rows
            if pending is not None:  # read the previous batch while this one runs
                done = _collect(*pending, requests, out, done, progress)
            pending = launched
        if pending is not None:
            _collect(*pending, requests, out, done, progress)
        s = self.stats
        s.seconds += time.perf_counter() - t0
        s.compilations += _counts["compiles"] - c0["compiles"]
        s.compile_seconds += _counts["compile_seconds"] - c0["compile_seconds"]
        s.step_traces += _counts["traces"] - c0["traces"]
        return out  # type: ignore[return-value]

    def _check(self, i: int, r: Request) -> int:
        if r.input_len > self.max_len:
            raise ValueError(
                f"request {i}: context ({len(r.context)}) + continuation "
                f"({len(r.continuation)}) tokens do not fit in max_len={self.max_len}"
            )
        lo = min(r.context.min(), r.continuation.min())
        hi = max(r.context.max(), r.continuation.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"request {i}: token ids must be in [0, {self.vocab_size})")
        return r.input_len

    def _launch(self, bucket: int, reqs: list[Request]):
        b = self.batch_size
        tokens = np.full((b, bucket), self.pad_id, np.int32)  # [B, S]
        targets = np.zeros((b, bucket), np.int32)  # [B, S]
        for row, r in enumerate(reqs):
            seq = np.concatenate([r.context, r.continuation])
            tokens[row, : len(seq) - 1] = seq[:-1]
            targets[row, : len(seq) - 1] = seq[1:]
        s = self.stats
        s.batches += 1
        s.tokens += sum(r.input_len for r in reqs)
        s.padded_tokens += b * bucket
        s.shapes.add((b, bucket))
        return _token_scores(self.model.logits(tokens), targets)


def _collect(outs, rows, requests, out, done: int, progress) -> int:
    """Reads one batch's [B, S] scores into `out` (sums in float64); returns requests done."""
    logp, greedy = (np.asarray(o) for o in outs)
    for row, i in enumerate(rows):
        r = requests[i]
        a, e = len(r.context) - 1, r.input_len  # continuation targets sit at [a, e)
        out[i] = Loglik(
            float(np.sum(logp[row, a:e], dtype=np.float64)), e - a, bool(np.all(greedy[row, a:e]))
        )
    done += len(rows)
    if progress is not None:
        progress(done, len(out))
    return done


def _plan(lengths: np.ndarray, buckets: tuple[int, ...], batch_size: int):
    """[(bucket, request indices)] batches: longest requests first, each in the smallest
    bucket that holds it, at most `batch_size` per batch."""
    order = np.argsort(-lengths, kind="stable")
    which = np.searchsorted(np.asarray(buckets), lengths[order])  # smallest bucket >= length
    batches = []
    for k in sorted(set(which.tolist()), reverse=True):
        idx = order[which == k]
        for j in range(0, len(idx), batch_size):
            batches.append((buckets[k], idx[j : j + batch_size].tolist()))
    return batches
