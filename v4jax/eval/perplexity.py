"""Perplexity and bits per byte over a corpus.

Inputs (`load_documents`):
- a plain-text file (any name not ending in `.jsonl`): the whole file is one document;
- jsonl, one document per line: `{"text": "..."}` (tokenized with the V4 tokenizer), or
  `{"tokens": [ids]}` (pre-tokenized, for models with their own small vocabulary such as the
  test fixtures).

A text document is scored as `BOS + encode(text)`: every text token is predicted, BOS is
context only, and bits per byte = total NLL / (ln 2 * UTF-8 bytes of the texts). A `tokens`
document's first token is context only (give it a BOS if the model expects one); bits per
byte are not defined for it.

Documents longer than the scorer's `max_len` are scored in sliding windows: the first window
predicts tokens 1 .. max_len, each later one predicts the next `stride` tokens given the
`max_len - stride + 1` tokens before them (model input always <= max_len). Every token is
predicted exactly once. `stride = max_len` (default) gives disjoint windows conditioned on
one previous token, lm-evaluation-harness's `loglikelihood_rolling`; a smaller stride gives
each prediction more context at the cost of more compute (the HF perplexity recipe).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence

import numpy as np

from v4jax.eval.data import DataError, field, read_jsonl, text_tokenizer, token_ids
from v4jax.eval.scoring import Request, Scorer

__all__ = ["Document", "PerplexityResult", "load_documents", "perplexity", "rolling_windows"]


@dataclasses.dataclass(frozen=True, eq=False)
class Document:
    """Token ids (the first is context only) and, for text, its UTF-8 byte count."""

    tokens: np.ndarray  # [N] int32, N >= 2
    num_bytes: int | None = None
    line: int | None = None


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    nll: float  # mean negative log-likelihood per predicted token (nats)
    perplexity: float  # exp(nll)
    num_tokens: int  # predicted tokens
    num_documents: int
    num_bytes: int | None  # UTF-8 bytes of the texts (None for pre-tokenized input)
    bits_per_byte: float | None
    max_len: int
    stride: int


def rolling_windows(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (w, a, e) over n tokens: model input tokens[w : e-1], predicted tokens[a : e]."""
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride={stride}: must be in [1, max_len={max_len}]")
    out, a = [], 1
    while a < n:
        e = min(n, a + (max_len if a == 1 else stride))
        w = max(0, e - 1 - max_len)
        out.append((w, a, e))
        a = e
    return out


def perplexity(
    scorer: Scorer,
    documents: Sequence[Document],
    *,
    stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of `documents` under the scorer's model (see the module docstring)."""
    stride = scorer.max_len if stride is None else stride
    requests = []
    for d in documents:
        t = d.tokens
        for w, a, e in rolling_windows(len(t), scorer.max_len, stride):
            requests.append(Request(t[w:a], t[a:e]))
    if not requests:
        raise ValueError("no tokens to predict: every document needs at least 2 tokens")
    scores = scorer.loglikelihood(requests, progress=progress)
    total = -math.fsum(s.logprob for s in scores)
    n = sum(s.num_tokens for s in scores)
    nbytes = [d.num_bytes for d in documents]
    num_bytes = sum(nbytes) if all(b is not None for b in nbytes) else None
    bpb = total / (math.log(2) * num_bytes) if num_bytes else None
    return PerplexityResult(
        nll=total / n,
        perplexity=math.exp(total / n),
        num_tokens=n,
        num_documents=len(documents),
        num_bytes=num_bytes,
        bits_per_byte=bpb,
        max_len=scorer.max_len,
        stride=stride,
    )


def load_documents(path: str | os.PathLike, *, vocab_size: int, tokenizer=None) -> list[Document]:
    """Documents of a plain-text or jsonl file (`text` or `tokens` per line); see above.

    `tokenizer` (a `v4jax.tokenizer.Tokenizer`) is needed for text; None when the model's
    vocabulary is not the V4 one, in which case text records are an error."""
    path = os.fspath(path)
    if not path.endswith(".jsonl"):
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return [_text_document(text, tokenizer, vocab_size, f"{path}:1")]
    docs = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        if "tokens" in obj:
            t = token_ids(obj["tokens"], "'tokens'", vocab_size, where)
            if len(t) < 2:
                raise DataError(f"{where}: 'tokens' needs at least 2 ids (the first is context)")
            docs.append(Document(t, None, n))
        elif "text" in obj:
            doc = _text_document(field(obj, "text", str, where), tokenizer, vocab_size, where)
            docs.append(dataclasses.replace(doc, line=n))
        else:
            raise DataError(f"{where}: missing field 'text' (or 'tokens')")
    if not docs:
        raise DataError(f"{path}: no records")
    return docs


def _text_document(text: str, tokenizer, vocab_size: int, where: str) -> Document:
    tok = text_tokenizer(tokenizer, vocab_size, where)
    if not text:
        raise DataError(f"{where}: empty text")
    return Document(np.asarray(tok.encode(text, add_bos=True), np.int32), len(text.encode()))
