"""Encoding a conversation into the DeepSeek-V4 prompt string (`encoding/encoding_dsv4.py`).

The specification is the release's `encoding/encoding_dsv4.py` (`encode_messages`); the
public golden pairs of its `encoding/tests/` are reproduced exactly (tests/test_chat_format.py).
The steps, in its order:

1. Tool results (`role: "tool"`) become `<tool_result>...</tool_result>` blocks of a user turn;
   a user message right after a user turn joins it; the turn's blocks are joined by blank
   lines. Several tool results are put in the order of the calls (by `tool_call_id`) of the
   latest assistant turn that made calls.
2. Tools anywhere turn `drop_thinking` off. In thinking mode with `drop_thinking`, messages
   before the last user / developer message lose their reasoning, and developer messages
   there are removed.
3. Each message is rendered: system text as is; `<｜User｜>` + text for user and developer
   turns; `<｜latest_reminder｜>` + text; an assistant turn as `[reasoning</think>]` + content
   + DSML tool calls + EOS (no EOS with `wo_eos`). A system or developer message with `tools`
   appends the `## Tools` section, with `response_format` the response-format section.
4. After a message that an assistant or latest_reminder message follows (or the last one) comes
   the generation opening: a task token (`action`: `<｜Assistant｜>` + `</think>`/`<think>` +
   `<｜action｜>`; others just the token) or, after a user / developer turn, `<｜Assistant｜>`
   then `<think>` (thinking mode, for the turn that keeps reasoning) or `</think>`.
5. BOS first (unless there is `context`); `reasoning_effort="max"` in thinking mode puts its
   preamble before the first message.

`render_messages` also returns where each assistant turn lies in the text, for loss masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from v4jax.chat import check
from v4jax.chat.dsml import write_tool_calls
from v4jax.chat.template import (
    ASSISTANT,
    BOS,
    EOS,
    LATEST_REMINDER,
    REASONING_EFFORT_MAX,
    RESPONSE_FORMAT_HEADER,
    TASK_TOKENS,
    THINK,
    THINK_END,
    TOOL_RESULT_CLOSE,
    TOOL_RESULT_OPEN,
    USER,
    ThinkingMode,
    tools_section,
)

__all__ = ["Rendered", "encode_messages", "render_messages"]


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A prompt and the character spans [start, end) of its assistant turns (reasoning kept,
    content, tool calls and EOS: what a model writes after the generation opening)."""

    text: str
    assistant_spans: tuple[tuple[int, int], ...]


def encode_messages(
    messages: Sequence[dict],
    thinking_mode: str | bool | ThinkingMode,
    context: Sequence[dict] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
    reasoning_effort: str | None = None,
    *,
    add_generation_prompt: bool = True,
) -> str:
    """The V4 prompt for `messages` (arguments as in the official `encode_messages`).

    `context`: messages already encoded before these (their text is not returned; they decide
    merging, tool-result order and reasoning dropping). `add_generation_prompt=False` leaves
    out the opening after a final user / developer turn (this package's addition)."""
    return render_messages(
        messages,
        thinking_mode,
        context=context,
        drop_thinking=drop_thinking,
        add_default_bos_token=add_default_bos_token,
        reasoning_effort=reasoning_effort,
        add_generation_prompt=add_generation_prompt,
    ).text


def render_messages(
    messages: Sequence[dict],
    thinking_mode: str | bool | ThinkingMode,
    *,
    context: Sequence[dict] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
    reasoning_effort: str | None = None,
    add_generation_prompt: bool = True,
) -> Rendered:
    """`encode_messages` plus the spans of the assistant turns in the returned text."""
    mode = check.thinking_mode(thinking_mode)
    check.options(
        drop_thinking=drop_thinking,
        reasoning_effort=reasoning_effort,
        add_default_bos_token=add_default_bos_token,
    )
    ctx = check.messages([] if context is None else context, "context")
    msgs = check.messages(messages)
    names = [f"context[{i}]" for i in range(len(ctx))] + [
        f"messages[{i}]" for i in range(len(msgs))
    ]
    check.assistant_placement(ctx + msgs, names)
    ctx, msgs = _merge_tool_results(ctx), _merge_tool_results(msgs)
    full = _order_tool_results(ctx + msgs)
    drop = drop_thinking and not any(m["tools"] for m in full)
    if mode is ThinkingMode.THINKING and drop:
        full = _drop_thinking(full)
        first = len(_drop_thinking(ctx))
    else:
        first = len(ctx)
    last_user = _last_user(full)
    out = [BOS] if add_default_bos_token and not ctx else []
    spans, length = [], len(out[0]) if out else 0
    for i in range(first, len(full)):
        pieces = []
        if i == 0 and mode is ThinkingMode.THINKING and reasoning_effort == "max":
            pieces.append(REASONING_EFFORT_MAX)
        body = _body(i, full, mode, drop, last_user)
        if full[i]["role"] == "assistant":
            start = length + sum(map(len, pieces))
            spans.append((start, start + len(body)))
        pieces.append(body)
        if add_generation_prompt or i + 1 < len(full):
            pieces.append(_opening(i, full, mode, drop, last_user))
        out += pieces
        length += sum(map(len, pieces))
    return Rendered("".join(out), tuple(spans))


def _merge_tool_results(msgs: list[dict]) -> list[dict]:
    """Tool results and consecutive user messages -> user turns with `blocks`."""
    out: list[dict] = []
    for m in msgs:
        open_turn = bool(out) and out[-1]["role"] == "user"
        if m["role"] == "tool":
            block = {"tool_result": m["content"], "id": m["tool_call_id"]}
            if open_turn:
                out[-1]["blocks"].append(block)
            else:
                out.append({**m, "role": "user", "content": None, "blocks": [block]})
        elif m["role"] == "user":
            block = {"text": m["content"]}
            if open_turn and out[-1]["task"] is None:
                out[-1]["blocks"].append(block)
            else:
                out.append({**m, "blocks": [block]})
        else:
            out.append(dict(m))
    return out


def _order_tool_results(msgs: list[dict]) -> list[dict]:
    """Several tool results of a user turn follow the order of the latest calls' ids (results
    with unknown ids count as the first call; the sort is stable)."""
    order: dict[str, int] = {}
    for m in msgs:
        if m["role"] == "assistant" and m["tool_calls"]:
            order = {c["id"]: k for k, c in enumerate(m["tool_calls"]) if c["id"]}
        elif m["role"] == "user":
            results = [b for b in m["blocks"] if "tool_result" in b]
            if len(results) > 1 and order:
                results.sort(key=lambda b: order.get(b["id"], 0))
                it = iter(results)
                m["blocks"] = [next(it) if "tool_result" in b else b for b in m["blocks"]]
    return msgs


def _last_user(msgs: list[dict]) -> int:
    return max((i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")), default=-1)


def _drop_thinking(msgs: list[dict]) -> list[dict]:
    """Before the last user / developer message: assistant turns lose their reasoning and
    developer messages are removed (the official `_drop_thinking_messages`)."""
    last = _last_user(msgs)
    out = []
    for i, m in enumerate(msgs):
        if i >= last or m["role"] in ("user", "system", "latest_reminder"):
            out.append(m)
        elif m["role"] == "assistant":
            out.append({**m, "reasoning_content": None})
    return out


def _body(i: int, msgs: list[dict], mode: ThinkingMode, drop: bool, last_user: int) -> str:
    """Message i's own text (without the opening that may follow it)."""
    m = msgs[i]
    role = m["role"]
    if role in ("system", "developer"):
        text = (USER if role == "developer" else "") + (m["content"] or "")
        if m["tools"]:
            text += "\n\n" + tools_section(m["tools"])
        if m["response_format"]:
            text += "\n\n" + RESPONSE_FORMAT_HEADER + m["response_format"]
        return text
    if role == "user":
        return USER + "\n\n".join(_block(b) for b in m["blocks"])
    if role == "latest_reminder":
        return LATEST_REMINDER + m["content"]
    return _assistant(i, msgs, mode, drop, last_user)


def _block(block: dict[str, Any]) -> str:
    if "text" in block:
        return block["text"]
    return TOOL_RESULT_OPEN + block["tool_result"] + TOOL_RESULT_CLOSE


def _assistant(i: int, msgs: list[dict], mode: ThinkingMode, drop: bool, last_user: int) -> str:
    m = msgs[i]
    reasoning = ""
    after_task = i > 0 and msgs[i - 1]["task"] is not None  # a task's answer has no reasoning
    if mode is ThinkingMode.THINKING and not after_task and (not drop or i > last_user):
        reasoning = (m["reasoning_content"] or "") + THINK_END
    calls = write_tool_calls(m["tool_calls"]) if m["tool_calls"] else ""
    return reasoning + (m["content"] or "") + calls + ("" if m["wo_eos"] else EOS)


def _opening(i: int, msgs: list[dict], mode: ThinkingMode, drop: bool, last_user: int) -> str:
    """What follows message i when an assistant or latest_reminder message (or nothing)
    follows it: a task token, or the assistant opening after a user / developer turn."""
    if i + 1 < len(msgs) and msgs[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return ""
    m = msgs[i]
    thinking = mode is ThinkingMode.THINKING
    if m["task"] is not None:
        token = TASK_TOKENS[m["task"]]
        if m["task"] != "action":
            return token
        return ASSISTANT + (THINK if thinking else THINK_END) + token
    if m["role"] in ("user", "developer"):
        keeps_reasoning = thinking and (not drop or i >= last_user)
        return ASSISTANT + (THINK if keeps_reasoning else THINK_END)
    return ""
