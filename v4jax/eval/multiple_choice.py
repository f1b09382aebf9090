"""Multiple-choice scoring in the lm-evaluation-harness way.

Each choice is scored by the summed log-likelihood of its tokens after the context.
`acc`: the argmax of the sums is the answer. `acc_norm`: the argmax of the sums divided by the
choice's length in UTF-8 bytes (lm-evaluation-harness divides by the length in characters;
the two agree for ASCII) or, for pre-tokenized items, in tokens. Ties go to the first choice
(`np.argmax`), and the reported standard errors are lm-eval's sqrt(p (1 - p) / (n - 1)).

File format (`load_items`), jsonl, one question per line:

    {"context": "Question: ...\\nAnswer:", "choices": ["yes", "no"], "answer": 0}
    {"context_tokens": [0, 17, 4], "choices_tokens": [[5], [9, 2]], "answer": 1}

`answer` is the 0-based index of the right choice. Text items are tokenized as lm-eval does:
a choice is scored as the tokens of `context + delimiter + choice` after those of `context`
(trailing spaces of the context move to the continuation), with BOS prepended to the
context; `delimiter` defaults to lm-eval's `target_delimiter`, one space. Token items are used
as given (the context must be non-empty).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence

import numpy as np

from v4jax.eval.data import DataError, field, read_jsonl, text_tokenizer, token_ids
from v4jax.eval.scoring import Request, Scorer

__all__ = ["ChoiceItem", "ItemScore", "MultipleChoiceResult", "load_items", "multiple_choice"]


@dataclasses.dataclass(frozen=True, eq=False)
class ChoiceItem:
    """One question: context ids, each choice's ids, the right index, normalisers."""

    context: np.ndarray  # [C] int32
    choices: tuple[np.ndarray, ...]  # each [T_k] int32
    answer: int
    lengths: tuple[int, ...]  # acc_norm divisors, in `unit`
    unit: str  # "bytes" (text items) or "tokens" (token items)
    line: int | None = None


@dataclasses.dataclass(frozen=True)
class ItemScore:
    line: int | None
    answer: int
    logprobs: tuple[float, ...]  # summed log-likelihood of each choice
    pred: int  # argmax of logprobs
    pred_norm: int  # argmax of logprobs / lengths


@dataclasses.dataclass(frozen=True)
class MultipleChoiceResult:
    acc: float
    acc_norm: float
    acc_stderr: float | None  # None for a single item
    acc_norm_stderr: float | None
    num_items: int
    normalization: str  # "bytes" (text items), "tokens" (token items) or "mixed"
    items: tuple[ItemScore, ...]


def multiple_choice(
    scorer: Scorer,
    items: Sequence[ChoiceItem],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> MultipleChoiceResult:
    """Scores every choice of every item in one pass of the scorer."""
    if not items:
        raise ValueError("no items")
    requests = [Request(it.context, c) for it in items for c in it.choices]
    scores = iter(scorer.loglikelihood(requests, progress=progress))
    out = []
    for it in items:
        lp = np.array([next(scores).logprob for _ in it.choices])
        norm = lp / np.asarray(it.lengths, np.float64)
        out.append(
            ItemScore(it.line, it.answer, tuple(lp.tolist()), int(lp.argmax()), int(norm.argmax()))
        )
    acc = float(np.mean([s.pred == s.answer for s in out]))
    acc_norm = float(np.mean([s.pred_norm == s.answer for s in out]))
    units = {it.unit for it in items}
    return MultipleChoiceResult(
        acc=acc,
        acc_norm=acc_norm,
        acc_stderr=_stderr(acc, len(out)),
        acc_norm_stderr=_stderr(acc_norm, len(out)),
        num_items=len(out),
        normalization=units.pop() if len(units) == 1 else "mixed",
        items=tuple(out),
    )


def load_items(
    path: str | os.PathLike,
    *,
    vocab_size: int,
    max_len: int,
    tokenizer=None,
    delimiter: str = " ",
) -> list[ChoiceItem]:
    """Items of a multiple-choice jsonl file (format above). Every problem -> DataError
    naming the line: missing or mis-typed fields, empty choices, an answer out of range, ids
    outside the vocabulary, a context + choice that does not fit in `max_len`."""
    path = os.fspath(path)
    items = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        if "context_tokens" in obj or "choices_tokens" in obj:
            item = _token_item(obj, vocab_size, where)
        else:
            item = _text_item(obj, tokenizer, vocab_size, delimiter, where)
        for k, c in enumerate(item.choices):
            if len(item.context) + len(c) - 1 > max_len:
                raise DataError(
                    f"{where}: context ({len(item.context)} tokens) + choice {k} "
                    f"({len(c)} tokens) do not fit in max_len {max_len}"
                )
        items.append(dataclasses.replace(item, line=n))
    if not items:
        raise DataError(f"{path}: no records")
    return items


def _answer(obj, n_choices: int, where: str) -> int:
    a = field(obj, "answer", int, where)
    if not 0 <= a < n_choices:
        raise DataError(f"{where}: answer {a} is not a choice index in [0, {n_choices})")
    return a


def _choices(obj, name: str, where: str) -> list:
    cs = field(obj, name, list, where)
    if not cs:
        raise DataError(f"{where}: {name!r} is empty")
    return cs


def _token_item(obj, vocab_size: int, where: str) -> ChoiceItem:
    ctx = token_ids(
        field(obj, "context_tokens", list, where), "'context_tokens'", vocab_size, where
    )
    raw = _choices(obj, "choices_tokens", where)
    choices = tuple(
        token_ids(c, f"choices_tokens[{k}]", vocab_size, where) for k, c in enumerate(raw)
    )
    answer = _answer(obj, len(choices), where)
    return ChoiceItem(ctx, choices, answer, tuple(map(len, choices)), "tokens")


def _text_item(obj, tokenizer, vocab_size: int, delimiter: str, where: str) -> ChoiceItem:
    context = field(obj, "context", str, where)
    raw = _choices(obj, "choices", where)
    for k, c in enumerate(raw):
        if not isinstance(c, str) or not c:
            raise DataError(f"{where}: choices[{k}] must be a non-empty string")
    answer = _answer(obj, len(raw), where)
    tok = text_tokenizer(tokenizer, vocab_size, where)
    # lm-eval: trailing spaces of the context belong to the continuation
    stripped = context.rstrip()
    moved = context[len(stripped) :]
    ctx = tok.encode(stripped, add_bos=True)
    wholes = tok.encode_batch([stripped + moved + delimiter + c for c in raw], add_bos=True)
    choices = []
    for k, whole in enumerate(wholes):
        cont = whole[len(ctx) :]
        if not cont:
            raise DataError(f"{where}: choices[{k}] tokenizes to nothing after the context")
        choices.append(np.asarray(cont, np.int32))
    lengths = tuple(len(c.encode()) for c in raw)
    return ChoiceItem(np.asarray(ctx, np.int32), tuple(choices), answer, lengths, "bytes")


def _stderr(p: float, n: int) -> float | None:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None
