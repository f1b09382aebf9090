"""The complete DeepSeek-V4 chat format (`v4jax.chat`).

The specification is the release's `encoding/encoding_dsv4.py`. Two kinds of evidence:
- its four public golden pairs (`tests/data/chat_golden/`, byte-identical to the release's
  `encoding/tests/`, checked by sha256), encoded exactly and parsed back as its own test does;
- hand-written cases, one or more per feature, whose expected strings are written from the
  official templates (never from this package's output). The `## Tools` section text is cut
  from golden output 1, so it too comes from the release, not from our template code.
"""

import hashlib
import json
import pathlib
import re

import pytest

from v4jax.chat import encode_messages, parse_completion, render_messages
from v4jax.tokenizer import format_chat

GOLDEN = pathlib.Path(__file__).parent / "data" / "chat_golden"
# sha256 of the release's encoding/tests/* (DeepSeek-V4-Flash @ 60d8d70), as pinned by a third
# party (see tests/data/chat_golden/SOURCE.md): our copies are the published bytes.
GOLDEN_SHA256 = {
    "test_input_1.json": "10e0c074c977c3a80daab758af28219c6b1c2bd7f3f5cf2890c84b361cc32897",
    "test_input_2.json": "c44ae0db20fafff38a6021e8068d7ed6e28605d76cafd20be80b03398509f447",
    "test_input_3.json": "37bf8ef95e0411ea5f411be0b02fbafec7363438b6ccefddca0c52ec9aeaf69a",
    "test_input_4.json": "c45bbd0a1b7a2f75033d8db4ba74ee5b7653bd01114045a52f79d3b387663465",
    "test_output_1.txt": "9b366d9d2eac842a6e890594aac0b58648e5623717202b33497afadf03e26540",
    "test_output_2.txt": "ca66b01a1ac3a204bb032c928fb607d4877171e998a50f7f89f39fa821b75665",
    "test_output_3.txt": "b3b1cd8748b7b90d3c6be6da3f786f12e4d70be073bd445ea162dfad4dc01a64",
    "test_output_4.txt": "60e1643840ba9e4aeede450feb7b0498fa66ee24e4a939d48855ce04ec6fc375",
}
GOLDEN_MODES = {1: "thinking", 2: "thinking", 3: "thinking", 4: "chat"}

BOS, EOS, U, A = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
D = "｜DSML｜"


def golden(k: int):
    data = json.loads((GOLDEN / f"test_input_{k}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):  # case 1: the official test puts the tools on the first message
        data["messages"][0]["tools"] = data["tools"]
        data = data["messages"]
    return data, (GOLDEN / f"test_output_{k}.txt").read_text(encoding="utf-8")


def tools_text(schemas: list[dict]) -> str:
    """The `## Tools` section for `schemas`, cut from golden output 1 (the release's text)."""
    out = golden(1)[1]
    head = out[out.index("## Tools") : out.index("### Available Tool Schemas\n\n") + 28]
    tail = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to "
    tail += "invoke tool calls.\n"
    assert out[out.index(tail) + len(tail) :].startswith(U)
    return head + "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas) + tail


P = f'<{D}parameter name="%s" string="%s">%s</{D}parameter>'  # one DSML parameter line
WEATHER = {"name": "weather", "parameters": {"type": "object"}}
TOOL = {"type": "function", "function": WEATHER}


def call(name, arguments, id=None):
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def user(text, **kw):
    return {"role": "user", "content": text, **kw}


def asst(text="", **kw):
    return {"role": "assistant", "content": text, **kw}


# ---------------------------------------------------------------------------------------------
# The public golden pairs


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_golden_pairs(k):
    for name in (f"test_input_{k}.json", f"test_output_{k}.txt"):
        assert hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest() == GOLDEN_SHA256[name]
    messages, want = golden(k)
    assert encode_messages(messages, GOLDEN_MODES[k]) == want
    assert format_chat(messages, thinking=GOLDEN_MODES[k] == "thinking") == want


def test_golden_parse_back():
    """The official test's parse checks on golden outputs 1 and 2."""
    prompt, mark = golden(1)[1], A + "<think>"
    first = prompt.index(mark) + len(mark)
    tc = parse_completion(prompt[first : prompt.index(U, first)], "thinking")
    assert tc["reasoning_content"].endswith("I should use the get_weather tool.")
    assert tc["content"] == "" and len(tc["tool_calls"]) == 1
    fn = tc["tool_calls"][0]["function"]
    assert fn["name"] == "get_weather"
    assert json.loads(fn["arguments"]) == {"location": "Beijing", "unit": "celsius"}
    final = parse_completion(prompt[prompt.rindex(mark) + len(mark) :], "thinking")
    assert final["reasoning_content"] == "Got the weather data. Let me format a nice response."
    assert "22°C" in final["content"] and final["tool_calls"] == []
    prompt = golden(2)[1]
    last = parse_completion(prompt[prompt.rindex(mark) + len(mark) :], "thinking")
    assert last["content"] == "The capital of France is Paris."
    assert "The user said hello" not in prompt  # drop_thinking


# ---------------------------------------------------------------------------------------------
# Encoding, one feature at a time (expected strings written from the official templates)


def test_tools_and_response_format_on_system_and_developer():
    fmt = {"type": "json_object"}
    rf = "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
    rf += '{"type": "json_object"}'
    sys = {"role": "system", "content": "S", "tools": [TOOL], "response_format": fmt}
    want = BOS + "S\n\n" + tools_text([WEATHER]) + rf + U + "q" + A + "</think>"
    assert encode_messages([sys, user("q")], "chat") == want
    dev = {"role": "developer", "content": "d", "tools": [TOOL], "response_format": fmt}
    want = BOS + U + "d\n\n" + tools_text([WEATHER]) + rf + A + "</think>"
    assert encode_messages([dev], "chat") == want


def test_tool_calls_dsml_string_and_json_parameters():
    args = '{"city": "Paris", "days": 3, "ok": true, "tags": ["a", "é"], "x": null, "o": {"k": 1}}'
    msgs = [user("q"), asst("Sure.", tool_calls=[call("weather", args)])]
    params = [("city", "true", "Paris"), ("days", "false", "3"), ("ok", "false", "true")]
    params += [("tags", "false", '["a", "é"]'), ("x", "false", "null"), ("o", "false", '{"k": 1}')]
    block = f'\n\n<{D}tool_calls>\n<{D}invoke name="weather">\n' + "\n".join(P % x for x in params)
    block += f"\n</{D}invoke>\n</{D}tool_calls>"
    want = BOS + U + "q" + A + "</think>Sure." + block + EOS
    assert encode_messages(msgs, "chat") == want


@pytest.mark.parametrize(
    "arguments, params",
    [
        ("not json", P % ("arguments", "true", "not json")),
        ("", P % ("arguments", "true", "")),
        ("{}", ""),
    ],
)
def test_tool_call_invalid_and_empty_arguments(arguments, params):
    text = encode_messages([user("q"), asst(tool_calls=[call("f", arguments)])], "chat")
    want = f'\n\n<{D}tool_calls>\n<{D}invoke name="f">\n{params}\n</{D}invoke>\n</{D}tool_calls>'
    assert text == BOS + U + "q" + A + "</think>" + want + EOS


def test_tool_results_ordered_by_call_id_and_merged_with_user():
    calls = [call("f", "{}", id="a"), call("g", "{}", id="b")]
    msgs = [
        user("q"),
        asst(tool_calls=calls),
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "A"}]},
        user("thanks"),
    ]
    text = encode_messages(msgs, "chat")
    turn = U + "<tool_result>A</tool_result>\n\n<tool_result>B</tool_result>\n\nthanks"
    assert text.endswith(EOS + turn + A + "</think>")
    # unknown ids sort as the first call (a stable sort); non-text blocks are marked
    msgs[2:4] = [
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "tool", "tool_call_id": "zz", "content": [{"type": "image"}]},
    ]
    text = encode_messages(msgs, "chat")
    assert "<tool_result>[Unsupported image]</tool_result>\n\n<tool_result>B</tool_result>" in text


def test_consecutive_user_messages_merge():
    text = encode_messages([user("a"), user("b"), asst("c")], "chat")
    assert text == BOS + U + "a\n\nb" + A + "</think>c" + EOS


def test_developer_and_latest_reminder():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "latest_reminder", "content": "2026-01-01"},
        {"role": "developer", "content": "dev"},
        asst("a", reasoning_content="r"),
        user("u"),
        {"role": "latest_reminder", "content": "R"},
        asst("b", reasoning_content="r2"),
    ]
    lr = "<｜latest_reminder｜>"
    chat = BOS + "S" + lr + "2026-01-01" + U + "dev" + A + "</think>a" + EOS
    chat += U + "u" + A + "</think>" + lr + "R" + "b" + EOS
    assert encode_messages(msgs, "chat") == chat
    # thinking mode drops the developer message and the reasoning before the last user turn
    think = BOS + "S" + lr + "2026-01-01" + "a" + EOS + U + "u" + A + "<think>" + lr + "R"
    assert encode_messages(msgs, "thinking") == think + "r2</think>b" + EOS


@pytest.mark.parametrize(
    "mode, task, opening",
    [
        ("chat", "action", A + "</think><｜action｜>"),
        ("thinking", "action", A + "<think><｜action｜>"),
        ("chat", "query", "<｜query｜>"),
        ("thinking", "title", "<｜title｜>"),
    ],
)
def test_tasks(mode, task, opening):
    text = encode_messages([user("q", task=task), asst("Search", reasoning_content="r")], mode)
    assert text == BOS + U + "q" + opening + "Search" + EOS  # a task's answer has no reasoning
    assert encode_messages([user("q", task=task)], mode) == BOS + U + "q" + opening


def test_wo_eos_leaves_the_turn_open():
    text = encode_messages([user("q"), asst("Sure, ", wo_eos=True)], "chat")
    assert text == BOS + U + "q" + A + "</think>Sure, "


@pytest.mark.parametrize("effort", [None, "high", "max"])
def test_reasoning_effort(effort):
    msgs = [{"role": "system", "content": "S"}, user("q")]
    preamble = (
        "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very "
        "thorough in your thinking and comprehensively decompose the problem to resolve the root "
        "cause, rigorously stress-testing your logic against all potential paths, edge cases, and "
        "adversarial scenarios.\nExplicitly write out your entire deliberation process, "
        "documenting every intermediate step, considered alternative, and rejected hypothesis to "
        "ensure absolutely no assumption is left unchecked.\n\n"
    )
    pre = preamble if effort == "max" else ""
    think = encode_messages(msgs, "thinking", reasoning_effort=effort)
    assert think == BOS + pre + "S" + U + "q" + A + "<think>"
    assert (
        encode_messages(msgs, "chat", reasoning_effort=effort)
        == BOS + "S" + U + "q" + A + "</think>"
    )


TWO_TURNS = [
    user("a"),
    asst("b", reasoning_content="r1"),
    user("c"),
    asst("d", reasoning_content="r2"),
]


def test_drop_thinking_default_false_and_tools():
    msgs = TWO_TURNS
    dropped = BOS + U + "a" + A + "</think>b" + EOS + U + "c" + A + "<think>r2</think>d" + EOS
    kept = BOS + U + "a" + A + "<think>r1</think>b" + EOS + U + "c" + A + "<think>r2</think>d" + EOS
    assert encode_messages(msgs, "thinking") == dropped
    assert format_chat(msgs, thinking=True, drop_thinking=False) == kept
    with_tools = [{"role": "system", "content": "", "tools": [TOOL]}, *msgs]
    assert encode_messages(with_tools, "thinking").endswith(kept[len(BOS) :])  # tools keep all


def test_context_and_generation_prompt_options():
    ctx = [user("a"), asst("b")]
    msgs = [user("c")]
    whole = encode_messages(ctx + msgs, "chat")
    assert encode_messages(ctx, "chat") + encode_messages(msgs, "chat", context=ctx) == whole
    assert encode_messages(msgs, "chat", add_default_bos_token=False) == U + "c" + A + "</think>"
    assert format_chat(msgs, add_generation_prompt=False) == BOS + U + "c"


@pytest.mark.parametrize("thinking", [True, "thinking", False, "chat"])
def test_thinking_argument_spellings(thinking):
    opening = "<think>" if thinking in (True, "thinking") else "</think>"
    assert format_chat([user("q")], thinking=thinking).endswith(A + opening)
    mode = "thinking" if thinking in (True, "thinking") else "chat"
    assert format_chat([user("q")], thinking_mode=mode).endswith(A + opening)
    assert encode_messages([user("q")], thinking).endswith(A + opening)


def test_assistant_spans_for_loss_masks():
    msgs = TWO_TURNS
    turn1 = BOS + U + "a" + A + "</think>"
    for mode, last_open, last in (
        ("chat", "</think>", "d"),
        ("thinking", "<think>", "r2</think>d"),
    ):
        r = render_messages(msgs, mode, add_generation_prompt=False)
        turn2 = turn1 + "b" + EOS + U + "c" + A + last_open
        assert r.text == turn2 + last + EOS
        assert r.assistant_spans == (
            (len(turn1), len(turn1) + 1 + len(EOS)),
            (len(turn2), len(r.text)),
        )


# ---------------------------------------------------------------------------------------------
# Refusals: one line, a ValueError or TypeError, naming the message and the field

SURROGATE = "bad \ud83d text"
A1, TC = "messages[1]", "messages[1].tool_calls[0]"


def tc(*calls):
    return [user("q"), asst(tool_calls=list(calls))]


def sys_tools(*tools):
    return [{"role": "system", "tools": list(tools)}]


BAD_OPTIONS = [  # (options, error type, message start)
    ({"thinking": "yes"}, ValueError, "thinking='yes': must be True / False or"),
    ({"thinking": 1}, ValueError, "thinking=1: must be"),
    ({"reasoning_effort": "low"}, ValueError, "reasoning_effort='low': must be one of"),
    ({"drop_thinking": None}, TypeError, "drop_thinking=None: must be True or False"),
    (
        {"thinking": True, "thinking_mode": "chat"},
        TypeError,
        "thinking=True, thinking_mode='chat': give one",
    ),
]
BAD_MESSAGES = [  # (messages, error type, where, what)
    ("hello", TypeError, "messages", "expected a list of message dicts, got str"),
    (["hi"], TypeError, "messages[0]", "expected a dict with a role, got str"),
    ([{"role": "robot"}], ValueError, "messages[0]", "role 'robot' is not one of"),
    ([asst("x")], ValueError, "messages[0]", "an assistant turn must follow a user"),
    ([user(None)], TypeError, "messages[0].content", "must be a string, got NoneType"),
    ([user(["a"])], TypeError, "messages[0].content", "must be a string, got list"),
    ([user(SURROGATE)], ValueError, "messages[0].content", "lone surrogate U+D83D at character 4"),
    ([{"role": "developer"}], ValueError, "messages[0].content", "developer messages need"),
    ([{"role": "latest_reminder"}], TypeError, "messages[0].content", "must be a string"),
    ([user("q"), {"role": "tool", "content": None}], TypeError, A1 + ".content", "a tool result"),
    ([user("q", task="summary")], ValueError, "messages[0].task", "'summary' is not one of"),
    ([user("a"), user("b", task="query")], ValueError, A1 + ".task", "this user message merges"),
    ([user("q", tools=[TOOL])], ValueError, "messages[0].tools", "user messages do not carry"),
    ([{"role": "system", "tool_calls": [1]}], ValueError, "messages[0].tool_calls", "system"),
    ([user("q"), asst(reasoning="r")], ValueError, A1 + ".reasoning", "use reasoning_content"),
    ([user("q"), asst(wo_eos="yes")], TypeError, A1 + ".wo_eos", "must be true or false"),
    (sys_tools("weather"), TypeError, "messages[0].tools[0]", "expected {"),
    (sys_tools({"function": {1: {2}}}), TypeError, "messages[0].tools[0].function", "not JSON"),
    (
        sys_tools({"function": {"d": SURROGATE}}),
        ValueError,
        "messages[0].tools[0].function",
        "lone",
    ),
    (tc({"name": "f"}), TypeError, TC, "expected {"),
    (tc(call("f", {"a": 1})), TypeError, TC + ".function.arguments", "must be a string, got dict"),
    (tc(call("f", "[1]")), ValueError, TC + ".function.arguments", "JSON list is not an object"),
    (tc(call("f", SURROGATE)), ValueError, TC + ".function.arguments", "lone surrogate U+D83D"),
    (tc(call(None, "{}")), TypeError, TC + ".function.name", "must be a string, got NoneType"),
]


def _refused(error, start, fn, *args, **kwargs):
    with pytest.raises(error) as e:
        fn(*args, **kwargs)
    assert isinstance(e.value, ValueError)  # also a ValueError: data loaders catch that one
    assert str(e.value).startswith(start) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("options, error, start", BAD_OPTIONS)
def test_bad_options_are_refused_clearly(options, error, start):
    _refused(error, start, format_chat, [user("q")], **options)


@pytest.mark.parametrize("messages, error, where, what", BAD_MESSAGES)
def test_bad_messages_are_refused_clearly(messages, error, where, what):
    _refused(error, f"{where}: ", format_chat, messages)
    with pytest.raises(error, match=re.escape(what)):
        format_chat(messages)
    _refused(error, f"context{where[8:]}: ", encode_messages, [], "chat", context=messages)


# ---------------------------------------------------------------------------------------------
# Parsing completions, and the round trip encode(prompt + [parse(x)]) == prompt + x

CALLS = "\n".join(
    [
        f"\n\n<{D}tool_calls>",
        f'<{D}invoke name="weather">',
        P % ("city", "true", "Paris"),
        P % ("days", "false", "3"),
        f"</{D}invoke>",
        f'<{D}invoke name="noop">',
        "",
        f"</{D}invoke>",
        f"</{D}tool_calls>",
    ]
)
ODD = f'\n\n<{D}tool_calls>\n<{D}invoke name="f">\n{P % ("arguments", "true", "a<b")}'
ODD += f"\n</{D}invoke>\n</{D}tool_calls>"  # '<' inside a value; no EOS after the calls
TWO = [("weather", '{"city": "Paris", "days": 3}'), ("noop", "{}")]
COMPLETIONS = [  # (mode, completion, content, reasoning, [(name, arguments)])
    ("chat", "Hello there." + EOS, "Hello there.", "", []),
    ("thinking", "Let me think.</think>Four." + EOS, "Four.", "Let me think.", []),
    ("thinking", "</think>" + EOS, "", "", []),
    ("chat", "On it." + CALLS + EOS, "On it.", "", TWO),
    ("thinking", "Need data.</think>" + CALLS + EOS, "", "Need data.", TWO),
    ("chat", ODD, "", "", [("f", '{"arguments": "a<b"}')]),
]


@pytest.mark.parametrize("mode, text, content, reasoning, calls", COMPLETIONS)
def test_parse_and_round_trip(mode, text, content, reasoning, calls):
    msg = parse_completion(text, mode)
    assert msg["role"] == "assistant"
    assert (msg["content"], msg["reasoning_content"]) == (content, reasoning)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == calls
    prompt = [{"role": "system", "content": "S"}, user("q")]
    head = encode_messages(prompt, mode)
    if not text.endswith(EOS):  # a call block may end without EOS; re-encoding adds it
        text += EOS
    assert encode_messages([*prompt, msg], mode) == head + text


@pytest.mark.parametrize(
    "mode, text, pattern",
    [
        ("thinking", "no end" + EOS, "never ends with </think>"),
        ("chat", "no eos", "does not end with <｜end▁of▁sentence｜>"),
        ("chat", "a" + EOS + "b", "unexpected text 'b' after"),
        ("chat", "a<think>b" + EOS, "special token '<think>' inside the content"),
        ("thinking", "r" + BOS + "</think>a" + EOS, "special token .* inside the reasoning"),
        ("chat", CALLS[: CALLS.index(f"</{D}invoke>")], "never closes"),
        ("chat", CALLS.replace('string="false"', 'string="no"') + EOS, "malformed parameter"),
        ("chat", CALLS.replace('"days"', '"city"') + EOS, "parameter 'city' given twice"),
        ("chat", CALLS.replace(' name="weather"', ' nam="weather"') + EOS, "malformed invoke"),
        ("chat", CALLS + "x" + EOS, "unexpected text 'x' after the tool calls"),
        ("maybe", EOS, "thinking_mode='maybe'"),
        ("chat", SURROGATE, r"completion: lone surrogate"),
    ],
)
def test_parse_refuses_malformed_completions(mode, text, pattern):
    with pytest.raises(ValueError, match=pattern) as e:
        parse_completion(text, mode)
    assert "\n" not in str(e.value)
