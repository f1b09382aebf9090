"""Packing tokenized documents into fixed-length training rows, as a checkpointable grain dataset.

V4 packs documents into training sequences (V4 report §4.1, "documents packed,
sample-level attention masking"). Here documents are concatenated into rows of S tokens in
stream order (concat-then-split): a row is filled with whole documents, and the document that
does not fit is split at the row end, its remainder starting the next row (so a document
longer than S spans several rows). Nothing is padded except the last row of the data.

Each row carries, all int32 [S] (a batch stacks B rows into [B, S]):
- `tokens`: the token ids (0 where padding);
- `mask`: mask[i] = 1 when token i is a training target predicted at position i - 1. It is 0
  at the first token of every document (a BOS, never predicted from the previous document's
  last token), at the first token of a continuation fragment (its predecessor is in the
  previous row) and on padding; so the loss never crosses a document boundary. mask[:, 0] is
  therefore always 0, matching `train.value_and_grad(model, tokens, mask)`, which ignores it.
  Within a document the source's own mask applies (e.g. only assistant tokens for chat SFT);
- `segment_ids`: 1, 2, ... for the document fragments of the row in order, 0 for padding;
- `positions`: the index of each token within its fragment (0 at each fragment start).

Attention: the model attends across documents inside a packed row (it has no per-document
attention mask yet; the report masks per document), so a document's tokens see the earlier
documents of its row as context. Only the loss is separated. `segment_ids` and `positions`
are what a per-document attention mask would need.

The iterator state is where the next batch starts in the document stream: `next_index` (the
document, an index into the shuffled and repeated document dataset) and `offset` (tokens of it
already emitted). It is a small JSON-able dict; restoring it reproduces the same batches.
Because it names a point in the token stream and not a batch, a resumed run may change B or S
(e.g. a batch-size ramp). Shuffling is per document (grain's index shuffle, reseeded each
epoch); rows are emitted in stream order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

__all__ = ["Batch", "Document", "PackedBatches", "held_out_split"]


@dataclasses.dataclass(frozen=True, eq=False)
class Document:
    """One tokenized document: `tokens` [N] and `mask` [N] (int32; mask[j] = 1 when token j
    is a target of the tokens before it; mask[0] is 0)."""

    tokens: np.ndarray
    mask: np.ndarray

    def __post_init__(self):
        if self.tokens.ndim != 1 or self.tokens.shape != self.mask.shape or not len(self.tokens):
            raise ValueError(
                f"Document: tokens {self.tokens.shape} and mask {self.mask.shape} must be "
                "equal non-empty 1-d arrays"
            )


@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
    """B packed rows of S tokens; all fields int32 [B, S] (see the module docstring)."""

    tokens: np.ndarray
    mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


def held_out_split(num_docs: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Document indices (train, held_out): a document is held out when a fixed hash of its
    index (splitmix64) falls below `fraction`, so the split does not depend on the shuffle seed
    and holds roughly `fraction` of the documents spread over the whole corpus."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held_out_fraction={fraction}: must be in [0, 1)")
    idx = np.arange(num_docs, dtype=np.uint64)
    with np.errstate(over="ignore"):  # splitmix64 relies on uint64 wrap-around
        z = idx + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # uniform in [0, 1)
    held = u < fraction
    return np.flatnonzero(~held), np.flatnonzero(held)


class PackedBatches(grain.IterDataset):
    """Batches of packed rows from a `grain.MapDataset` of `Document`s, in index order.

    `read_threads` threads tokenize documents ahead of the packer (grain's prefetch);
    `identity` (JSON-able) is stored in the iterator state and checked on restore, so a state
    from a different corpus, seed or tokenizer is refused instead of silently misread.
    """

    def __init__(
        self,
        docs: grain.MapDataset,
        *,
        seq_len: int,
        batch_size: int,
        read_threads: int = 1,
        identity: Mapping[str, Any] | None = None,
    ):
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len}, batch_size={batch_size}: need S >= 2, B >= 1")
        options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64)
        super().__init__(docs.to_iter_dataset(options))
        self.seq_len, self.batch_size = seq_len, batch_size
        self.identity = dict(identity or {})

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(
            self._parent.__iter__(),
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            identity=self.identity,
        )

    def __str__(self) -> str:
        return f"PackedBatches(seq_len={self.seq_len}, batch_size={self.batch_size})"


class PackedBatchIterator(grain.DatasetIterator):
    """Yields `Batch`es; `get_state()` / `set_state()` as described in the module docstring.
    The last batch of finite data is padded with empty rows (segment 0, mask 0)."""

    def __init__(self, parent, *, seq_len: int, batch_size: int, identity: Mapping[str, Any]):
        super().__init__(parent)
        self.seq_len, self.batch_size, self._identity = seq_len, batch_size, dict(identity)
        self._doc: Document | None = None  # the document being emitted
        self._doc_index = 0  # its index in the parent's order
        self._offset = 0  # tokens of it already emitted
        self._exhausted = False

    def __next__(self) -> Batch:
        B, S = self.batch_size, self.seq_len
        out = np.zeros((4, B, S), np.int32)  # tokens, mask, segment_ids, positions
        rows = 0
        while rows < B and self._fill_row(out[:, rows]):
            rows += 1
        if rows == 0:
            raise StopIteration
        return Batch(*out)

    def _next_doc(self) -> bool:
        if self._exhausted:
            return False
        self._doc_index = grain.experimental.get_next_index(self._parent)
        try:
            self._doc = next(self._parent)
        except StopIteration:
            self._exhausted = True
            return False
        self._offset = 0
        return True

    def _fill_row(self, row: np.ndarray) -> bool:
        """Fills row [4, S] from the stream; False when the stream has no tokens left."""
        tokens, mask, segment_ids, positions = row
        filled = segment = 0
        while filled < self.seq_len and (self._doc is not None or self._next_doc()):
            doc, a = self._doc, self._offset
            n = min(self.seq_len - filled, len(doc.tokens) - a)
            tokens[filled : filled + n] = doc.tokens[a : a + n]
            mask[filled : filled + n] = doc.mask[a : a + n]
            mask[filled] = 0  # a fragment's first token is never a target of the token before
            segment += 1
            segment_ids[filled : filled + n] = segment
            positions[filled : filled + n] = np.arange(n, dtype=np.int32)
            filled += n
            self._offset += n
            if self._offset == len(doc.tokens):
                self._doc = None
        return filled > 0

    def get_state(self) -> dict[str, Any]:
        if self._doc is not None:
            index, offset = self._doc_index, self._offset
        else:
            index, offset = grain.experimental.get_next_index(self._parent), 0
        return {**self._identity, "next_index": int(index), "offset": int(offset)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        for key, want in self._identity.items():
            if state.get(key) != want:
                raise ValueError(
                    f"data state: {key}={state.get(key)!r} but this pipeline has {want!r}; "
                    "the state belongs to different data"
                )
        index, offset = int(state["next_index"]), int(state["offset"])
        grain.experimental.set_next_index(self._parent, index)
        self._doc, self._exhausted = None, False
        if offset > 0:
            if not self._next_doc() or offset >= len(self._doc.tokens):
                raise ValueError(f"data state: offset {offset} is past document {index}'s end")
            self._offset = offset

    def __str__(self) -> str:
        return f"PackedBatchIterator(seq_len={self.seq_len}, batch_size={self.batch_size})"
