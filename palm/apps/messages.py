"""OpenAI chat ``messages`` read into the turns of the chat template, for every server of a chat
model here (``palm serve``'s ``/v1/chat/completions`` and the MLflow pyfunc's chat requests): the
same roles, the same content forms and the same refusals."""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")


class BadMessages(ValueError):
    """A refused ``messages`` list: the message, the request field at fault and an error code."""

    def __init__(self, message: str, param: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


def chat_turns(messages: Any, max_messages: int, cap_name: str = "--max-messages") -> list[tuple[str, str]]:
    """``(role, text)`` of each message: roles system (or OpenAI's ``developer``), user and
    assistant; content a string or a list of content parts (their text parts, joined)."""
    if not isinstance(messages, list) or not messages:
        raise BadMessages("messages must be a non-empty list", "messages")
    if len(messages) > max_messages:
        raise BadMessages(f"the request has {len(messages)} messages; at most {max_messages} ({cap_name})",
                          "messages", "too_many_messages")
    turns = []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise BadMessages(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                              f"messages[{i}].role")
        if isinstance(content, list):  # content parts: their text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise BadMessages(f"messages[{i}].content must be a string", f"messages[{i}].content")
        turns.append((role, content))
    return turns
