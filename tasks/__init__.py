"""rollover.tasks: what is asked and how answers are scored; nothing about engines or training.

- `registry`: tasks that regenerate a record from its `spec` (arithmetic, reasoning-gym, a dataset)
- `arithmetic`, `word_problems`: the built-in tasks (the second ships as a GSM8K-style dataset)
- `prompts`: a record's question to the prompt token ids (raw, or through a chat template)
- `rewards`, `reward_workers`: reward functions with TRL's signature, isolated in processes
- `config`: the recipe's `task` section and `Section`; `errors`: the shared error vocabulary
"""
