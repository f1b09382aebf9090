"""The DeepSeek-V4 chat format: conversations to prompt text and completions back to messages.

The specification is the release's `encoding/encoding_dsv4.py` (in the official release
repositories); the official argument names are kept. Modules: `template.py` (the fixed strings),
`check.py` (input checking, one clear error per problem), `encode.py` (messages -> prompt),
`dsml.py` (the tool-call tag format), `parse.py` (completion -> message).

    from v4jax.chat import encode_messages, parse_completion
    prompt = encode_messages(
        [{"role": "system", "content": "Be brief.", "tools": tools},
         {"role": "user", "content": "Weather in Paris?"}],
        thinking_mode="thinking",
    )                                    # ... <｜User｜>Weather in Paris?<｜Assistant｜><think>
    msg = parse_completion(completion_text, thinking_mode="thinking")
    # {"role": "assistant", "reasoning_content": ..., "content": ..., "tool_calls": [...]}

`v4jax.tokenizer.format_chat` / `Tokenizer.encode_chat` are thin wrappers over `encode_messages`.
"""

from v4jax.chat.check import ChatFormatError, ChatTypeError
from v4jax.chat.dsml import DSMLError
from v4jax.chat.encode import Rendered, encode_messages, render_messages
from v4jax.chat.parse import parse_completion, parse_message_from_completion_text
from v4jax.chat.template import TASK_TOKENS, ThinkingMode

__all__ = [
    "ChatFormatError",
    "ChatTypeError",
    "DSMLError",
    "Rendered",
    "TASK_TOKENS",
    "ThinkingMode",
    "encode_messages",
    "parse_completion",
    "parse_message_from_completion_text",
    "render_messages",
]
