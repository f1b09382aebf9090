"""Synthetic passkey retrieval at a chosen context length (Mohtashami & Jaggi 2023 style).

A sample is an introduction, filler text, a needle ("The pass key is 71432. Remember it.
71432 is the pass key.") at a depth in the filler, and a question ("What is the pass key?
The pass key is"); the context is exactly `context_len` tokens. Two scores per sample:

- greedy: every token of " 71432" is the model's argmax after the context (teacher-forced
  greedy match, equal to greedy decoding producing the key);
- candidates: the true key has the highest log-likelihood among `num_candidates` keys with
  the same number of digits (the true key and random distractors).

Depths are spread evenly over the samples, from the start (0) to the end (1) of the filler.

With the V4 tokenizer the texts above are used. Models with their own small vocabulary (the
test fixtures, `tiny()`) get the same structure in token ids: BOS 0, digit d -> id 3 + d,
markers 13 ("the pass key is"), 14 ("remember it"), 15 ("what is"), and a fixed pseudo-random
20-token filler sentence drawn from ids >= 16.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from v4jax.eval.scoring import Request, Scorer

__all__ = ["PasskeyResult", "PasskeySample", "passkey"]

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"

_DIGIT0, _KEY_IS, _REMEMBER, _WHAT, _FILLER0 = 3, 13, 14, 15, 16


@dataclasses.dataclass(frozen=True)
class PasskeySample:
    depth: float  # needle position in the filler, 0 (start) .. 1 (end)
    key: str
    greedy: bool  # the greedy continuation is the key
    retrieved: bool  # the key beats every distractor key by log-likelihood
    logprob: float  # log-likelihood of the key


@dataclasses.dataclass(frozen=True)
class PasskeyResult:
    context_len: int  # tokens before the key, exactly
    num_samples: int
    num_candidates: int
    greedy_accuracy: float
    candidate_accuracy: float
    mean_logprob: float  # of the true key
    mode: str  # "text" (V4 tokenizer) or "tokens" (synthetic ids)
    samples: tuple[PasskeySample, ...]


def passkey(
    scorer: Scorer,
    *,
    context_len: int,
    num_samples: int = 8,
    num_candidates: int = 5,
    digits: int = 5,
    tokenizer=None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> PasskeyResult:
    """Runs `num_samples` passkey samples of `context_len` tokens (see the module docstring).
    `tokenizer`: the V4 tokenizer for text samples; None for synthetic token samples."""
    if num_samples < 1 or num_candidates < 1 or not 1 <= digits <= 9:
        raise ValueError("num_samples and num_candidates must be >= 1, digits in [1, 9]")
    if num_candidates > 9 * 10 ** (digits - 1):
        raise ValueError(f"num_candidates={num_candidates}: more than the {digits}-digit keys")
    build = _TextBuilder(tokenizer) if tokenizer is not None else _TokenBuilder(scorer.vocab_size)
    rng = np.random.default_rng(seed)
    samples, requests = [], []
    for i in range(num_samples):
        depth = i / (num_samples - 1) if num_samples > 1 else 0.5
        keys = _keys(rng, digits, num_candidates)
        ctx = build.context(keys[0], context_len, depth)
        conts = [build.key(k) for k in keys]
        need = context_len + max(map(len, conts)) - 1
        if need > scorer.max_len:
            raise ValueError(
                f"context_len={context_len}: with the key the model input is {need} tokens, "
                f"more than max_len={scorer.max_len}"
            )
        requests += [Request(ctx, c) for c in conts]
        samples.append((depth, keys[0]))
    scores = scorer.loglikelihood(requests, progress=progress)
    out = []
    for i, (depth, key) in enumerate(samples):
        mine = scores[i * num_candidates : (i + 1) * num_candidates]
        lps = np.array([s.logprob for s in mine])
        out.append(
            PasskeySample(depth, key, mine[0].greedy, bool(lps.argmax() == 0), float(lps[0]))
        )
    return PasskeyResult(
        context_len=context_len,
        num_samples=num_samples,
        num_candidates=num_candidates,
        greedy_accuracy=float(np.mean([s.greedy for s in out])),
        candidate_accuracy=float(np.mean([s.retrieved for s in out])),
        mean_logprob=float(np.mean([s.logprob for s in out])),
        mode="text" if tokenizer is not None else "tokens",
        samples=tuple(out),
    )


def _keys(rng: np.random.Generator, digits: int, n: int) -> list[str]:
    """n distinct keys of `digits` digits (no leading zero); the first is the true one."""
    keys: list[str] = []
    lo, hi = 10 ** (digits - 1), 10**digits
    while len(keys) < n:
        k = str(int(rng.integers(lo, hi)))
        if k not in keys:
            keys.append(k)
    return keys


def _assemble(head, needle, question, filler, context_len: int, depth: float) -> np.ndarray:
    n_fill = context_len - len(head) - len(needle) - len(question)
    if n_fill < 0:
        minimum = context_len - n_fill
        raise ValueError(f"context_len={context_len}: too short, the sample needs {minimum}")
    reps = -(-n_fill // len(filler)) if n_fill else 0
    fill = np.tile(np.asarray(filler, np.int32), reps)[:n_fill]
    cut = int(round(depth * n_fill))
    parts = [head, fill[:cut], needle, fill[cut:], question]
    return np.concatenate([np.asarray(p, np.int32) for p in parts])  # [context_len]


class _TextBuilder:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.head = tokenizer.encode(INTRO, add_bos=True)
        self.filler = tokenizer.encode(FILLER)
        self.question = tokenizer.encode(QUESTION)

    def context(self, key: str, context_len: int, depth: float) -> np.ndarray:
        needle = self.tok.encode(NEEDLE.format(key=key))
        return _assemble(self.head, needle, self.question, self.filler, context_len, depth)

    def key(self, key: str) -> np.ndarray:
        return np.asarray(self.tok.encode(" " + key), np.int32)


class _TokenBuilder:
    def __init__(self, vocab_size: int):
        if vocab_size < 64:
            raise ValueError(f"synthetic passkey needs a vocabulary of >= 64 ids, not {vocab_size}")
        rng = np.random.default_rng(1234)
        self.filler = rng.integers(_FILLER0, vocab_size, 20)
        self.head = [0]
        self.question = [_WHAT, _KEY_IS]

    def context(self, key: str, context_len: int, depth: float) -> np.ndarray:
        k = list(self.key(key))
        needle = [_KEY_IS, *k, _REMEMBER, *k, _KEY_IS]
        return _assemble(self.head, needle, self.question, self.filler, context_len, depth)

    def key(self, key: str) -> np.ndarray:
        return np.asarray([_DIGIT0 + int(c) for c in key], np.int32)
