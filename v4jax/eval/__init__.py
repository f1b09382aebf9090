"""Evaluation under `jit`: log-likelihoods, perplexity / bits per byte, multiple choice, passkey.

Everything is built on one primitive, `Scorer.loglikelihood` (`scoring.py`): requests
(context ids, continuation ids) are padded into a few fixed [batch_size, bucket] shapes, so the
model and the scoring step compile once per bucket; `Scorer.stats` counts the compilations.
The tasks turn files or parameters into requests and requests' scores into frozen result
dataclasses:

    scorer = Scorer(model, max_len=2048, batch_size=8)
    perplexity(scorer, load_documents("wiki.jsonl", vocab_size=V, tokenizer=tok))
    multiple_choice(scorer, load_items("mc.jsonl", vocab_size=V, max_len=2048, tokenizer=tok))
    passkey(scorer, context_len=1024, tokenizer=tok)

`scripts/evaluate.py` is the command line. Models are used through the public API only
(`model.config`, `model.logits`), so a model placed on a mesh evaluates the same way.
"""

from v4jax.eval.data import DataError
from v4jax.eval.multiple_choice import (
    ChoiceItem,
    ItemScore,
    MultipleChoiceResult,
    load_items,
    multiple_choice,
)
from v4jax.eval.passkey import PasskeyResult, PasskeySample, passkey
from v4jax.eval.perplexity import (
    Document,
    PerplexityResult,
    load_documents,
    perplexity,
    rolling_windows,
)
from v4jax.eval.scoring import Loglik, Request, Scorer, ScorerStats, default_buckets

__all__ = [
    "ChoiceItem",
    "DataError",
    "Document",
    "ItemScore",
    "Loglik",
    "MultipleChoiceResult",
    "PasskeyResult",
    "PasskeySample",
    "PerplexityResult",
    "Request",
    "Scorer",
    "ScorerStats",
    "default_buckets",
    "load_documents",
    "load_items",
    "multiple_choice",
    "passkey",
    "perplexity",
    "rolling_windows",
]
