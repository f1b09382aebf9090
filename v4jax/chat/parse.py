"""Parsing a model's completion back into an assistant message (`encoding_dsv4.py`).

A completion is what the model writes after the prompt's generation opening: in thinking mode
`reasoning</think>`, then the answer, then optionally a blank line and a DSML tool-call block,
then EOS. `parse_completion` returns the official `parse_message_from_completion_text` result,

    {"role": "assistant", "content": ..., "reasoning_content": ..., "tool_calls": [...]}

with OpenAI-style calls (`{"type": "function", "function": {"name", "arguments"}}`, arguments
a JSON string), so that the message can be appended to the conversation and encoded again:
`encode(prompt messages + [parse(x)])` ends with exactly `x` for well-formed `x`.

Refused like the official parser (as `ChatFormatError`, a `ValueError`): a thinking-mode
completion without `</think>`, an answer without EOS, text after EOS or after the tool calls,
special tokens inside the answer or reasoning, malformed DSML. One deliberate difference: a
tool-call block cut off before its closing tag (generation stopped early) is refused, where
the official parser returns the calls read so far.
"""

from __future__ import annotations

from v4jax.chat import check
from v4jax.chat.check import ChatFormatError
from v4jax.chat.dsml import read_tool_calls, scan_until
from v4jax.chat.template import EOS, RESERVED, THINK_END, TOOL_CALLS_OPEN, ThinkingMode

__all__ = ["parse_completion", "parse_message_from_completion_text"]

_CALLS_START = "\n\n" + TOOL_CALLS_OPEN[:-1]  # the block's opening, up to its '>'


def parse_completion(text: str, thinking_mode: str | bool | ThinkingMode = "chat") -> dict:
    """A completion (decoded with its special tokens, EOS included) -> an assistant message."""
    mode = check.thinking_mode(thinking_mode)
    check.text("completion", text)
    pos, reasoning = 0, ""
    if mode is ThinkingMode.THINKING:
        pos, reasoning, stop = scan_until(text, 0, (THINK_END, _CALLS_START))
        if stop != THINK_END:
            raise ChatFormatError(
                f"completion: thinking mode, but the reasoning never ends with {THINK_END}"
            )
    pos, content, stop = scan_until(text, pos, (EOS, _CALLS_START))
    calls = []
    if stop == _CALLS_START:
        pos, calls = read_tool_calls(text, pos)
        pos, rest, stop = scan_until(text, pos, (EOS,))
        if rest:
            raise ChatFormatError(f"completion: unexpected text {rest[:40]!r} after the tool calls")
    elif stop != EOS:
        raise ChatFormatError(f"completion: the answer does not end with {EOS}")
    if pos != len(text):
        raise ChatFormatError(f"completion: unexpected text {text[pos : pos + 40]!r} after {EOS}")
    for part, name in ((content, "content"), (reasoning, "reasoning")):
        for token in RESERVED:
            if token in part:
                raise ChatFormatError(f"completion: special token {token!r} inside the {name}")
    return {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": [{"type": "function", "function": c} for c in calls],
    }


parse_message_from_completion_text = parse_completion  # the official name
