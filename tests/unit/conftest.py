"""A tiny random Qwen2 model on disk, for trainer tests that need a real transformers model."""

from __future__ import annotations

import pytest


def save_tiny_model(folder, **config_overrides) -> str:
    """A 2-layer Qwen2 with the built-in character tokenizer and an untied LM head, saved to `folder`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rollover.trainer.builtin.models import make_tokenizer

    tokenizer = make_tokenizer()
    settings = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                    tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id)
    settings.update(config_overrides)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**settings))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tiny_model(tmp_path):
    """Path of a freshly saved tiny model."""
    return save_tiny_model(tmp_path / "tiny")
