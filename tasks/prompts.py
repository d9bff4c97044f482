"""Prompt formatting: a task record's question to the token ids the engine receives."""

from __future__ import annotations

from typing import Any


def prompt_ids(record: dict[str, Any], tokenizer, prompt_format: str, system_prompt: str | None) -> list[int]:
    """Raw question text, or the model's chat template with a generation prompt."""
    if prompt_format == "raw":
        text = (system_prompt + "\n" if system_prompt else "") + record["question"]
        return tokenizer.encode(text)
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": record["question"]})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
