"""builtin:chat-math in the real vLLM engine: chat prompts, stop on <|im_end|>, resume from ids.

One engine start for the module (~25 s): the session's shared engine serves tiny-math.
"""

from __future__ import annotations

import asyncio

import pytest

from rollover.tasks import word_problems as wp

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def chat_engine(loop):
    from rollover.rollout.engine import EngineSettings, RolloutEngine
    from rollover.trainer.builtin.models import resolve_model_path

    eng = RolloutEngine(EngineSettings(model=resolve_model_path("builtin:chat-math"), max_model_len=256))
    asyncio.set_event_loop(loop)
    eng.start()
    yield eng
    asyncio.set_event_loop(loop)
    loop.run_until_complete(eng.wait_idle())
    eng.shutdown()
    loop.run_until_complete(asyncio.sleep(0.1))


def test_vllm_generates_chat_answers_that_stop_on_im_end_and_resume_from_ids(chat_engine, run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollover.rollout.settings import SamplingSettings
    from rollover.tasks.prompts import prompt_ids
    from rollover.trainer.builtin.models import resolve_model_path

    path = resolve_model_path("builtin:chat-math")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    greedy = SamplingSettings(temperature=0.0)
    rows = wp.read_jsonl(wp.DATA_DIR / wp.TEST_FILE)[:4]
    same = 0
    for row in rows:
        prompt = prompt_ids(row, tok, "chat", wp.SYSTEM_PROMPT)
        out = run(chat_engine.generate(prompt, 64, greedy))
        # Ends on the template's end token, kept in the response (what the trainer trains on).
        assert out.finish_reason == "stop" and out.token_ids[-1] == end, out
        text = chat_engine.decode(out.token_ids)
        assert "<|im_end|>" not in text and "####" in text
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)
        same += hf[0, len(prompt):].tolist() == list(out.token_ids)
        # A resumed request sends prompt + response-so-far ids and continues the same way.
        cut = len(out.token_ids) // 2
        rest = run(chat_engine.generate(prompt + list(out.token_ids[:cut]), 64 - cut, greedy))
        assert list(out.token_ids[:cut]) + list(rest.token_ids) == list(out.token_ids)
    assert same >= len(rows) - 1  # engine and transformers agree on greedy answers
