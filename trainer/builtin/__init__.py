"""rollover.trainer.builtin: models that ship with rollover, so tests and demos need no download.

- `models`: the `builtin:` names, their cache and resolver, and the character-level arithmetic
  models (`builtin:tiny-math`, shipped; `builtin:small-math`, built on first use)
- `variants`: `builtin:tiny-math-wide`, tiny-math with other shapes and token ids (no training)
- `chat_math`: `builtin:chat-math`, a byte-level BPE chat model on word problems (shipped)
- `warm_start`: the one supervised warm-start loop every built-in model is trained with
- `shipped/<name>/`: the shipped weights, tokenizers and build info, loaded as hub models are
"""
