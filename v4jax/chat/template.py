"""The fixed strings of the DeepSeek-V4 chat format (`encoding/encoding_dsv4.py`).

Everything the model was trained to read lives here: the special-token strings, the DSML tag
names, the `## Tools` section that lists the tool schemas, the response-format section and the
`reasoning_effort="max"` preamble. The texts are data, reproduced character for character from
the release's `encoding/encoding_dsv4.py` (DeepSeek-V4-Flash @ 60d8d70); a single changed
character changes the prompt the model sees, which the golden-pair tests catch.
"""

from __future__ import annotations

import enum

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK, THINK_END = "<think>", "</think>"
DSML = "｜DSML｜"  # one added token (id 128825); the tags below are built around it

# `task` -> the token that asks for the task's quick answer (`action` opens an assistant turn)
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

# DSML tool-call tags
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"  # + ' name="NAME">'
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_OPEN = f"<{DSML}parameter"  # + ' name="KEY" string="true|false">VALUE'
PARAM_CLOSE = f"</{DSML}parameter>"
TOOL_RESULT_OPEN, TOOL_RESULT_CLOSE = "<tool_result>", "</tool_result>"

# Strings that may never appear inside parsed content or reasoning.
RESERVED = (BOS, EOS, THINK, THINK_END, DSML)


class ThinkingMode(enum.Enum):
    """`chat`: answer right after `</think>`; `thinking`: reason inside `<think>...</think>`."""

    CHAT = "chat"
    THINKING = "thinking"


REASONING_EFFORTS = (None, "high", "max")  # "high" is the default and adds nothing

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate "
    "step, considered alternative, and rejected hypothesis to ensure absolutely no assumption "
    "is left unchecked.\n\n"
)

RESPONSE_FORMAT_HEADER = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
)


def tools_section(schemas: list[str]) -> str:
    """The `## Tools` section for tool schemas already written as one-line JSON each."""
    example = "\n".join(
        [
            TOOL_CALLS_OPEN,
            f'{INVOKE_OPEN} name="$TOOL_NAME">',
            f'{PARAM_OPEN} name="$PARAMETER_NAME" string="true|false">'
            f"$PARAMETER_VALUE{PARAM_CLOSE}",
            "...",
            INVOKE_CLOSE,
            f'{INVOKE_OPEN} name="$TOOL_NAME2">',
            "...",
            INVOKE_CLOSE,
            TOOL_CALLS_CLOSE,
        ]
    )
    return (
        "## Tools\n\n"
        "You have access to a set of tools to help answer the user's question. You can invoke "
        f'tools by writing a "{TOOL_CALLS_OPEN}" block like the following:\n\n'
        f"{example}\n\n"
        'String parameters should be specified as is and set `string="true"`. For all other '
        "types (numbers, booleans, arrays, objects), pass the value in JSON format and set "
        '`string="false"`.\n\n'
        f"If thinking_mode is enabled (triggered by {THINK}), you MUST output your complete "
        f"reasoning inside {THINK}...{THINK_END} BEFORE any tool calls or final response.\n\n"
        f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
        "### Available Tool Schemas\n\n"
        + "\n".join(schemas)
        + "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to "
        "invoke tool calls.\n"
    )
