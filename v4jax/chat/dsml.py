"""DSML, the tag format of DeepSeek-V4 tool calls: writing a call block and reading one back.

An assistant turn that calls tools ends (before EOS) with a blank line and

    <｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

Each top-level key of the call's JSON arguments becomes one parameter: strings are written as
they are with `string="true"`, every other value as JSON with `string="false"`. Arguments that
are not valid JSON become a single string parameter named `arguments`. Reading reverses this:
string values are JSON-quoted, the others are copied as written, giving the arguments string of
an OpenAI-style tool call. Behaviour follows the release's `encoding/encoding_dsv4.py`
(`encode_arguments_to_dsml`, `parse_tool_calls`), including what it refuses.
"""

from __future__ import annotations

import json
import re

from v4jax.chat.check import ChatFormatError
from v4jax.chat.template import (
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAM_CLOSE,
    PARAM_OPEN,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_OPEN,
)

__all__ = ["DSMLError", "read_tool_calls", "scan_until", "write_tool_calls"]


class DSMLError(ChatFormatError):
    """A completion's tool-call block does not follow the DSML format."""


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def write_arguments(arguments: str) -> str:
    """A call's JSON arguments -> its parameter lines."""
    try:
        values = json.loads(arguments)
    except ValueError:
        values = {"arguments": arguments}
    lines = []
    for key, value in values.items():
        is_str = isinstance(value, str)
        body = value if is_str else _json(value)
        flag = "true" if is_str else "false"
        lines.append(f'{PARAM_OPEN} name="{key}" string="{flag}">{body}{PARAM_CLOSE}')
    return "\n".join(lines)


def write_tool_calls(calls: list[dict]) -> str:
    """[{"name", "arguments"}] -> the block, with the blank line that precedes it."""
    invokes = [
        f'{INVOKE_OPEN} name="{c["name"]}">\n{write_arguments(c["arguments"])}\n{INVOKE_CLOSE}'
        for c in calls
    ]
    return f"\n\n{TOOL_CALLS_OPEN}\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_CLOSE}"


# Reading. `text[pos:]` starts right after the opening `<｜DSML｜tool_calls`; each helper returns
# the position after what it consumed. Tags are found by plain search, as in the official parser.
# The official parser matches whole strings with `^...$`, and `$` also accepts one trailing
# newline: hence `fullmatch` with an optional final `\n`.
_INVOKE_NAME = re.compile(r'\s*name="(.*?)">\n\n?', re.DOTALL)
_PARAM = re.compile(r' name="(.*?)" string="(true|false)">(.*?)<\n?', re.DOTALL)


def scan_until(text: str, pos: int, stops: tuple[str, ...]) -> tuple[int, str, str | None]:
    """(position after the first stop found, text before it, that stop) or (end, rest, None)."""
    hits = [(text.find(s, pos), s) for s in stops]
    hits = [(at, s) for at, s in hits if at >= 0]
    if not hits:
        return len(text), text[pos:], None
    at, stop = min(hits)
    return at + len(stop), text[pos:at], stop


def read_tool_calls(text: str, pos: int) -> tuple[int, list[dict]]:
    """Parse the block from just after `<｜DSML｜tool_calls`; (position after it, calls as
    {"name", "arguments"}). Raises `DSMLError` naming what was expected."""
    calls = []
    while True:
        pos, gap, stop = scan_until(text, pos, (INVOKE_OPEN, TOOL_CALLS_CLOSE))
        if stop is None:
            raise DSMLError(f"tool calls: the block never closes with {TOOL_CALLS_CLOSE}")
        if gap != ">\n":
            raise DSMLError(f"tool calls: expected '>\\n' before the next tag, got {gap!r}")
        if stop == TOOL_CALLS_CLOSE:
            return pos, calls
        pos, head, stop = scan_until(text, pos, (PARAM_OPEN, INVOKE_CLOSE[:-1]))
        m = _INVOKE_NAME.fullmatch(head)
        if m is None:
            raise DSMLError(f"tool calls: malformed invoke name {head!r}")
        pos, args = _read_parameters(text, pos, stop)
        calls.append({"name": m.group(1), "arguments": args})


def _read_parameters(text: str, pos: int, stop: str | None) -> tuple[int, str]:
    """The parameters of one invoke -> (position after `</｜DSML｜invoke`, JSON arguments)."""
    values: dict[str, tuple[str, str]] = {}
    while stop == PARAM_OPEN:
        pos, body, _ = scan_until(text, pos, (PARAM_CLOSE[1:-1],))
        m = _PARAM.fullmatch(body)
        if m is None:
            raise DSMLError(f"tool calls: malformed parameter {body!r}")
        key, flag, value = m.groups()
        if key in values:
            raise DSMLError(f"tool calls: parameter {key!r} given twice")
        values[key] = (value, flag)
        pos, gap, stop = scan_until(text, pos, (PARAM_OPEN, INVOKE_CLOSE[:-1]))
        if gap != ">\n":
            raise DSMLError(f"tool calls: expected '>\\n' after a parameter, got {gap!r}")
    if stop is None:
        raise DSMLError(f"tool calls: an invoke never closes with {INVOKE_CLOSE}")
    items = [f"{_json(k)}: {_json(v) if f == 'true' else v}" for k, (v, f) in values.items()]
    return pos, "{" + ", ".join(items) + "}"
