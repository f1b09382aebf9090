"""Checking chat messages before encoding: one clear error naming the message and the field.

The official encoder (`encoding_dsv4.py`) refuses bad input through asserts, KeyErrors or
errors from deep inside `str.join`; a string with a lone surrogate passes it and fails later in
the tokenizer. Here every refusal is one line that starts with the place, e.g.
`messages[2].tool_calls[0].function.arguments: ...`: a `ChatFormatError` (a `ValueError`) for a
wrong value, a `ChatTypeError` (both a `TypeError` and a `ChatFormatError`) for a wrong type.

Refused like the official encoder: unknown roles, `thinking` modes and `reasoning_effort`
values, unknown `task`s, empty developer content, non-string user content, tool definitions or
calls without their `function` fields, tool-call arguments whose JSON is not an object.
Refused in addition (the official encoder would silently drop them or print `None`): fields
on roles that never render them (e.g. `tools` on a user message, `tool_calls` on a system
message), the unofficial `reasoning` spelling, `latest_reminder` / tool content that is not
text, a `task` on a user message that merges into the user message before it, an assistant
turn with no user turn before it (there is no `<｜Assistant｜>` token to open it).

The result is one plain dict per message with every field normalised (tool schemas and the
response format already written as JSON), which `encode.py` renders without further checks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from v4jax.chat.template import REASONING_EFFORTS, TASK_TOKENS, ThinkingMode


class ChatFormatError(ValueError):
    """A conversation the V4 chat format cannot encode (message and field named first)."""


class ChatTypeError(ChatFormatError, TypeError):
    """A field of the wrong type; both a `TypeError` and a `ChatFormatError` (`ValueError`),
    so callers that catch `ValueError` for bad data see it too."""


ROLES = ("system", "user", "assistant", "developer", "latest_reminder", "tool")
_ROLE_FIELDS = {  # optional fields and the roles that render them
    "tools": ("system", "developer"),
    "response_format": ("system", "developer"),
    "tool_calls": ("assistant",),
    "reasoning_content": ("assistant",),
    "wo_eos": ("assistant",),
    "tool_call_id": ("tool",),
    "task": ("system", "user", "assistant", "developer", "latest_reminder"),
}


def thinking_mode(value: Any, name: str = "thinking_mode") -> ThinkingMode:
    """`"chat"` / `"thinking"` / a `ThinkingMode`; also `True` / `False` (thinking / chat)."""
    if isinstance(value, ThinkingMode):
        return value
    if isinstance(value, bool):
        return ThinkingMode.THINKING if value else ThinkingMode.CHAT
    if isinstance(value, str) and value in ("chat", "thinking"):
        return ThinkingMode(value)
    raise ChatFormatError(f'{name}={value!r}: must be True / False or "chat" / "thinking"')


def options(*, drop_thinking: Any, reasoning_effort: Any, add_default_bos_token: Any) -> None:
    """The encoder's keyword options."""
    for name, value in (
        ("drop_thinking", drop_thinking),
        ("add_default_bos_token", add_default_bos_token),
    ):
        if not isinstance(value, bool):
            raise ChatTypeError(f"{name}={value!r}: must be True or False")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ChatFormatError(
            f"reasoning_effort={reasoning_effort!r}: must be one of {REASONING_EFFORTS}"
        )


def messages(msgs: Any, name: str = "messages") -> list[dict]:
    """Check a list of messages; return normalised copies (see the module docstring)."""
    if isinstance(msgs, (str, bytes)) or not isinstance(msgs, Sequence):
        raise ChatTypeError(f"{name}: expected a list of message dicts, got {type(msgs).__name__}")
    out = [_message(f"{name}[{i}]", m) for i, m in enumerate(msgs)]
    _merged_tasks(out, name)
    return out


def _merged_tasks(msgs: list[dict], name: str) -> None:
    """A user message joins the user turn open before it (one opened by a user message without
    a task, or by tool results); its own task would then be lost, so it is refused."""
    turn_task: str | None = None
    in_user_turn = False
    for i, m in enumerate(msgs):
        if m["role"] == "tool":
            turn_task = turn_task if in_user_turn else None
            in_user_turn = True
        elif m["role"] == "user":
            if in_user_turn and turn_task is None:
                if m["task"] is not None:
                    raise ChatFormatError(
                        f"{name}[{i}].task: this user message merges into the user turn before "
                        "it, so its task would be lost; put the task on the turn's first message"
                    )
            else:
                turn_task, in_user_turn = m["task"], True
        else:
            in_user_turn = False


def assistant_placement(msgs: list[dict], names: list[str]) -> None:
    """Every assistant turn needs a user / developer / tool turn before it (latest_reminder
    messages in between allowed): that turn ends with the `<｜Assistant｜>` opening."""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        j = i - 1
        while j >= 0 and msgs[j]["role"] == "latest_reminder":
            j -= 1
        if j < 0 or msgs[j]["role"] not in ("user", "developer", "tool"):
            raise ChatFormatError(
                f"{names[i]}: an assistant turn must follow a user, developer or tool turn"
            )


def _message(where: str, m: Any) -> dict:
    if not isinstance(m, Mapping):
        raise ChatTypeError(f"{where}: expected a dict with a role, got {type(m).__name__}")
    role = m.get("role")
    if role not in ROLES:
        raise ChatFormatError(f"{where}: role {role!r} is not one of {ROLES}")
    for field, roles in _ROLE_FIELDS.items():
        if _present(m.get(field)) and role not in roles:
            raise ChatFormatError(f"{where}.{field}: {role} messages do not carry {field}")
    if _present(m.get("reasoning")):
        raise ChatFormatError(
            f"{where}.reasoning: not a field of the official format; use reasoning_content"
        )
    return {
        "role": role,
        "content": _content(where, role, m),
        "reasoning_content": _optional_text(
            f"{where}.reasoning_content", m.get("reasoning_content")
        ),
        "tools": _tools(f"{where}.tools", m.get("tools")),
        "response_format": _response_format(f"{where}.response_format", m.get("response_format")),
        "tool_calls": _tool_calls(f"{where}.tool_calls", m.get("tool_calls")),
        "tool_call_id": _optional_text(f"{where}.tool_call_id", m.get("tool_call_id")) or "",
        "wo_eos": _flag(f"{where}.wo_eos", m.get("wo_eos", False)),
        "task": _task(f"{where}.task", m.get("task")),
    }


def _present(value: Any) -> bool:
    """Absent: missing, None, False or empty (exports often fill unused fields with null)."""
    return (
        value is not None
        and value is not False
        and not (isinstance(value, (str, list, tuple, dict)) and not value)
    )


def _content(where: str, role: str, m: Mapping) -> str | None:
    field = f"{where}.content"
    value = m.get("content")
    if role == "tool":
        return _tool_content(field, value if "content" in m else "")
    if role in ("system", "assistant"):
        return _optional_text(field, value)
    value = "" if "content" not in m and role == "user" else value
    if role == "developer" and not value:
        raise ChatFormatError(f"{field}: developer messages need non-empty content")
    return text(field, value)


def text(where: str, value: Any) -> str:
    """A string that is valid Unicode (no lone surrogates, which no tokenizer can encode)."""
    if not isinstance(value, str):
        raise ChatTypeError(f"{where}: must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        raise ChatFormatError(
            f"{where}: lone surrogate U+{code:04X} at character {e.start} is not valid Unicode"
        ) from None
    return value


def _optional_text(where: str, value: Any) -> str | None:
    return None if value is None else text(where, value)


def _flag(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ChatTypeError(f"{where}: must be true or false, got {value!r}")
    return value


def _task(where: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or value not in TASK_TOKENS):
        raise ChatFormatError(f"{where}: {value!r} is not one of {tuple(TASK_TOKENS)}")
    return value


def to_json(where: str, value: Any) -> str:
    """One-line JSON, non-ASCII kept (the official `to_json`), as valid Unicode."""
    try:
        dumped = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ChatTypeError(f"{where}: not JSON-serialisable ({e})") from None
    return text(where, dumped)


def _tools(where: str, tools: Any) -> list[str] | None:
    """OpenAI-style tool list -> the one-line JSON of each `function` definition."""
    if not _present(tools):
        return None
    if not isinstance(tools, (list, tuple)):
        raise ChatTypeError(f"{where}: must be a list of tools, got {type(tools).__name__}")
    out = []
    for k, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping):
            raise ChatTypeError(
                f'{where}[{k}]: expected {{"type": "function", "function": {{...}}}}, got {tool!r}'
            )
        if tool.get("type", "function") != "function":
            raise ChatFormatError(f"{where}[{k}].type: {tool['type']!r} is not 'function'")
        out.append(to_json(f"{where}[{k}].function", dict(fn)))
    return out


def _response_format(where: str, value: Any) -> str | None:
    return to_json(where, value) if _present(value) else None


def _tool_calls(where: str, calls: Any) -> list[dict] | None:
    """OpenAI-style tool calls -> [{"id", "name", "arguments"}] (arguments a JSON string)."""
    if not _present(calls):
        return None
    if not isinstance(calls, (list, tuple)):
        raise ChatTypeError(f"{where}: must be a list of tool calls, got {type(calls).__name__}")
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping):
            raise ChatTypeError(
                f'{where}[{k}]: expected {{"function": {{"name": ..., "arguments": ...}}}}, '
                f"got {call!r}"
            )
        if call.get("type", "function") != "function":
            raise ChatFormatError(f"{where}[{k}].type: {call['type']!r} is not 'function'")
        name = text(f"{where}[{k}].function.name", fn.get("name"))
        args = fn.get("arguments")
        args = text(f"{where}[{k}].function.arguments", args)
        _check_arguments(f"{where}[{k}].function.arguments", args)
        call_id = call.get("id") or fn.get("id") or ""
        out.append({"id": text(f"{where}[{k}].id", call_id), "name": name, "arguments": args})
    return out


def _check_arguments(where: str, args: str) -> None:
    """Valid JSON must be an object (one DSML parameter per key); invalid JSON is kept as one
    string parameter named `arguments`, as the official encoder does."""
    try:
        value = json.loads(args)
    except ValueError:
        return
    if not isinstance(value, dict):
        raise ChatFormatError(
            f"{where}: JSON {type(value).__name__} is not an object of parameters"
        )


def _tool_content(where: str, value: Any) -> str:
    """A tool result: a string, or content blocks (text blocks joined by blank lines, other
    block types marked `[Unsupported TYPE]` as in the official encoder)."""
    if isinstance(value, str):
        return text(where, value)
    if not isinstance(value, (list, tuple)):
        raise ChatTypeError(
            f"{where}: a tool result must be a string or a list of content blocks, "
            f"got {type(value).__name__}"
        )
    parts = []
    for k, block in enumerate(value):
        if not isinstance(block, Mapping):
            raise ChatTypeError(f"{where}[{k}]: expected a content block dict, got {block!r}")
        kind = block.get("type")
        if kind == "text":
            parts.append(text(f"{where}[{k}].text", block.get("text", "")))
        else:
            parts.append(f"[Unsupported {kind}]")
    return "\n\n".join(parts)
