"""The supervised warm start every built-in model gets before RL.

One loop for tiny-math and its variants (`models.py`) and chat-math (`chat_math.py`): AdamW with a
50-step linear warm-up, gradient clipping at 1.0, optional bfloat16 autocast, and a held-out
greedy evaluation every `eval_every` steps that stops the run once the accuracy reaches the band
the model should start RL in (RL needs room to learn, and a model that never answers right gets
no signal).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

WARMUP_STEPS = 50

Batch = tuple[Any, Any, Any]  # input ids, attention mask, labels (-100 where no loss)


def warm_start(model, batch: Callable[[int], Batch], accuracy: Callable[[Any], float], *, lr: float,
               max_steps: int, min_steps: int, eval_every: int, target_accuracy: float, bf16: bool,
               on_eval: Callable[[int, float, float], None] | None = None) -> tuple[int, float, list[list]]:
    """Train `model` on `batch(step)` for up to `max_steps`; returns (steps, last accuracy, curve).

    `accuracy(model)` runs with the model in eval mode; the curve holds [step, loss, accuracy]
    per evaluation, and `on_eval(step, loss, accuracy)` reports each one as it happens.
    """
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    accuracy_now, step, curve = 0.0, 0, []
    for step in range(1, max_steps + 1):
        model.train()
        ids, mask, labels = batch(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / WARMUP_STEPS)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % eval_every == 0:
            model.eval()
            accuracy_now = accuracy(model)
            curve.append([step, round(loss.item(), 4), accuracy_now])
            if on_eval is not None:
                on_eval(step, loss.item(), accuracy_now)
            if step >= min_steps and accuracy_now >= target_accuracy:
                break
    return step, accuracy_now, curve
