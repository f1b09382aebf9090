"""Training data: tokenization, loss masks, and the grain pipeline over local files.

Sources and their errors: `sources.py`; packing, batching and the iterator state: `packing.py`.

Tokenization (`tokenizer_mode`): models whose vocabulary holds the official V4 tokenizer
(vocab_size >= 129280) use it; smaller vocabularies (the tiny test presets) use UTF-8 bytes,
byte b -> id b + BYTE_OFFSET (= 2), which keeps BOS = 0 and EOS = 1 free; in byte mode the
BOS / EOS marker strings map to 0 / 1 and every other character to its bytes.

Documents and loss masks (V4 report §4.1; the official chat format):
- text: BOS + tokens + EOS; every token after BOS is a target (pretraining);
- chat: the official chat encoding (`v4jax.chat.render_messages`, `add_generation_prompt=False`);
  only the assistant turns are targets: the answer, its reasoning when kept (thinking mode, last
  turn) with its `</think>`, its tool calls and its EOS. The boundaries are the assistant spans
  the renderer reports (the prompt part ends at `<｜Assistant｜></think>` or `<think>`), and each
  piece is tokenized on its own; the pieces meet at special tokens, where
  the BPE never merges, so the ids equal the encoding of the whole conversation.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from v4jax.chat import render_messages
from v4jax.tokenizer import BOS, EOS, VOCAB_SIZE, load_tokenizer
from v4jax.train.packing import Document, PackedBatches, held_out_split
from v4jax.train.sources import Corpus, DataError, DocKind, load_corpus

__all__ = [
    "BYTE_OFFSET",
    "ByteTokenizer",
    "Corpus",
    "DataConfig",
    "DataError",
    "Datasets",
    "DocKind",
    "TokenizerMode",
    "build_datasets",
    "encode_chat_document",
    "encode_document",
    "encode_text_document",
    "load_corpus",
    "make_tokenizer",
    "tokenizer_mode",
]

BYTE_OFFSET = 2  # byte b -> token id b + 2; ids 0 / 1 stay BOS / EOS


class TokenizerMode(enum.Enum):
    OFFICIAL = "official"  # the V4 BPE tokenizer (vocab_size >= 129280)
    BYTES = "bytes"  # UTF-8 bytes + BYTE_OFFSET (small test vocabularies)


def tokenizer_mode(vocab_size: int) -> TokenizerMode:
    """Which tokenization a model with `vocab_size` gets (see the module docstring)."""
    if vocab_size >= VOCAB_SIZE:
        return TokenizerMode.OFFICIAL
    if vocab_size >= 256 + BYTE_OFFSET:
        return TokenizerMode.BYTES
    raise ValueError(
        f"vocab_size={vocab_size}: too small for byte tokens (needs >= {256 + BYTE_OFFSET}) "
        f"and for the official tokenizer (needs >= {VOCAB_SIZE})"
    )


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as token ids (b -> b + BYTE_OFFSET); the same `encode` / `decode` surface as
    `v4jax.tokenizer.Tokenizer`, with the BOS / EOS strings as single tokens 0 / 1."""

    bos_id: int = 0
    eos_id: int = 1
    vocab_size: int = 256 + BYTE_OFFSET
    _SPECIAL = re.compile(f"({re.escape(BOS)}|{re.escape(EOS)})")

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        for part in self._SPECIAL.split(text):
            if part in (BOS, EOS):
                ids.append(self.bos_id if part == BOS else self.eos_id)
            else:
                ids.extend(b + BYTE_OFFSET for b in part.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], bytearray()
        for i in (int(i) for i in ids):
            if BYTE_OFFSET <= i < self.vocab_size:
                run.append(i - BYTE_OFFSET)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            # a model with a larger vocabulary may emit ids that are no byte: U+FFFD
            special = {self.bos_id: BOS, self.eos_id: EOS}
            out.append(special.get(i, "\ufffd"))
            run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


def make_tokenizer(vocab_size: int, tokenizer=None):
    """The tokenizer for `tokenizer_mode(vocab_size)`: `tokenizer` (or `load_tokenizer()`) in
    official mode, a `ByteTokenizer` in byte mode."""
    if tokenizer_mode(vocab_size) is TokenizerMode.BYTES:
        return ByteTokenizer()
    return tokenizer if tokenizer is not None else load_tokenizer()


# ---------------------------------------------------------------------------------------------
# Documents


def encode_document(corpus: Corpus, i: int, tokenizer) -> Document:
    """Document i of `corpus`, tokenized with its loss mask."""
    record = corpus.read(i)
    if corpus.kind[i] == DocKind.TEXT_FILE:
        return encode_text_document(record, tokenizer)
    if corpus.kind[i] == DocKind.TEXT:
        return encode_text_document(record["text"], tokenizer)
    thinking = bool(record.get("thinking", False))
    return encode_chat_document(record["messages"], tokenizer, thinking=thinking)


def encode_text_document(text: str, tokenizer) -> Document:
    """BOS + tokens + EOS, every token after BOS a target."""
    ids = np.asarray([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id], np.int32)
    mask = np.ones_like(ids)
    mask[0] = 0
    return Document(ids, mask)


def encode_chat_document(messages, tokenizer, *, thinking: bool = False) -> Document:
    """The official chat encoding of a conversation; only assistant tokens are targets."""
    rendered = render_messages(messages, thinking, add_generation_prompt=False)
    full = rendered.text
    ids, mask, done = [], [], 0
    for a, b in rendered.assistant_spans:
        for (s, e), target in (((done, a), 0), ((a, b), 1)):
            piece = tokenizer.encode(full[s:e]) if e > s else []
            ids += piece
            mask += [target] * len(piece)
        done = b
    tail = tokenizer.encode(full[done:]) if done < len(full) else []
    ids, mask = np.asarray(ids + tail, np.int32), np.asarray(mask + [0] * len(tail), np.int32)
    return Document(ids, mask)


# ---------------------------------------------------------------------------------------------
# Pipeline


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What to train on and how to batch it."""

    paths: tuple[str, ...]  # files, directories or glob patterns
    seq_len: int  # S: tokens per row
    batch_size: int  # B: rows per batch
    seed: int = 0  # document shuffle (reseeded each epoch)
    num_epochs: int | None = None  # None: repeat forever
    held_out_fraction: float = 0.0  # documents held out for perplexity (hash of the index)
    shuffle: bool = True
    read_threads: int = 1  # threads reading and tokenizing documents ahead of the packer

    def __post_init__(self):
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs={self.num_epochs}: must be >= 1 or None")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed}: must be in [0, 2**32)")


@dataclasses.dataclass(frozen=True, eq=False)
class Datasets:
    """`train`: shuffled, repeated packed batches (checkpoint `iterator.get_state()`);
    `held_out`: the held-out documents once, unshuffled (None without a held-out fraction);
    each `iter()` starts from its beginning."""

    train: PackedBatches
    held_out: PackedBatches | None
    mode: TokenizerMode
    corpus: Corpus
    num_train_docs: int
    num_held_out_docs: int

    def describe(self) -> str:
        """One line for the training log."""
        how = (
            "official V4 tokenizer"
            if self.mode is TokenizerMode.OFFICIAL
            else f"UTF-8 bytes (byte b -> id b+{BYTE_OFFSET}; the vocabulary is below {VOCAB_SIZE})"
        )
        return (
            f"data: {len(self.corpus.files)} files, {len(self.corpus)} documents "
            f"({self.num_train_docs} train, {self.num_held_out_docs} held out); tokens: {how}"
        )


def build_datasets(config: DataConfig, *, vocab_size: int, tokenizer=None) -> Datasets:
    """Index the files, split, and build the train and held-out pipelines (nothing tokenized
    yet). `tokenizer`: an already loaded official tokenizer to reuse (official mode only)."""
    corpus = load_corpus(config.paths)
    mode = tokenizer_mode(vocab_size)
    tok = make_tokenizer(vocab_size, tokenizer)
    train_idx, held_idx = held_out_split(len(corpus), config.held_out_fraction)
    if config.held_out_fraction > 0 and (len(held_idx) == 0 or len(train_idx) == 0):
        raise DataError(
            f"held_out_fraction={config.held_out_fraction} leaves {len(train_idx)} train and "
            f"{len(held_idx)} held-out documents of {len(corpus)}; change the fraction"
        )
    identity = {  # what must match for a saved iterator state to mean the same stream
        "num_docs": len(corpus),
        "held_out_fraction": config.held_out_fraction,
        "seed": config.seed,
        "shuffle": config.shuffle,
        "tokenizer": mode.value,
    }
    docs = grain.MapDataset.source(train_idx.tolist())
    if config.shuffle:
        docs = docs.shuffle(seed=_mix(config.seed))
    docs = docs.repeat(config.num_epochs).map(_Encoder(corpus, tok))
    kw = dict(seq_len=config.seq_len, batch_size=config.batch_size)
    train = PackedBatches(docs, read_threads=config.read_threads, identity=identity, **kw)
    held = None
    if len(held_idx):
        held_docs = grain.MapDataset.source(held_idx.tolist()).map(_Encoder(corpus, tok))
        held = PackedBatches(held_docs, read_threads=config.read_threads, **kw)
    return Datasets(train, held, mode, corpus, len(train_idx), len(held_idx))


@dataclasses.dataclass(frozen=True)
class _Encoder:
    corpus: Corpus
    tokenizer: Any

    def __call__(self, i: int) -> Document:
        return encode_document(self.corpus, i, self.tokenizer)


def _mix(seed: int) -> int:
    """A well-spread 32-bit shuffle seed: grain reseeds epoch e with seed + e, so nearby user
    seeds would otherwise share epoch orders."""
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])
