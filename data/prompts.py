"""A prompt as it is kept: text, or a chat conversation written as canonical JSON text.

The store's ``prompts`` table keeps one string per prompt, and ``prompt_id`` hashes that string. A chat
prompt (``[{"role": "user", "content": "…"}, …]``) is kept as ``chat_text(messages)``: JSON with sorted
keys and no extra whitespace, so the same conversation always has the same text and the same id, whatever
file it was read from. The policy turns it into tokens with its tokenizer's chat template when it samples
and scores (``solvers/causal_lm.CausalLMPolicy.render``): rendering belongs to the model, not to the store,
so one stored prompt serves any model.
"""

from __future__ import annotations

import json

ROLES = ("system", "user", "assistant")


def chat_text(messages: list[dict]) -> str:
    """The stored text of a chat prompt (canonical JSON); refuses what is not a conversation."""
    problem = message_problem(messages)
    if problem:
        raise ValueError(problem)
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def chat_messages(prompt: str) -> list[dict] | None:
    """The messages of a stored chat prompt, or None for a plain-text prompt."""
    if not prompt.startswith('[{"'):  # what chat_text writes; cheap for the plain prompts
        return None
    try:
        messages = json.loads(prompt)
    except json.JSONDecodeError:
        return None
    return messages if message_problem(messages) is None else None


def message_problem(messages) -> str | None:
    """Why ``messages`` is not a chat prompt (None when it is): a non-empty list of {role, content}
    with a known role and text content, ending with the user's turn (the model answers it)."""
    if not isinstance(messages, list) or not messages:
        return "a chat prompt is a non-empty list of {role, content} messages"
    for i, m in enumerate(messages):
        # A Parquet struct column gives every row every field: an unset one (None) is no field.
        if not isinstance(m, dict) or {k for k, v in m.items() if v is not None} - {"role", "content"} or "role" not in m or "content" not in m:
            return f"message {i}: expected an object with 'role' and 'content' only, got {m!r}"
        if m["role"] not in ROLES:
            return f"message {i}: role must be one of {', '.join(ROLES)}, got {m['role']!r}"
        if not isinstance(m["content"], str):
            return f"message {i}: content must be text, got {type(m['content']).__name__}"
    if messages[-1]["role"] != "user":
        return f"the last message is the {messages[-1]['role']}'s: a chat prompt ends with the user's turn"
    return None
