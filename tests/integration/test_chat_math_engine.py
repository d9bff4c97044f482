"""builtin:chat-math in the real vLLM engine: chat prompts, stop on <|im_end|>, resume from ids.

One engine start for the module (~25 s): the session's shared engine serves tiny-math. The
engine serves a LoRA checkpoint of chat-math as rl-train writes it (merged weights in
`save_pretrained` format, the adapter beside them), so the same start also shows that vLLM
loads our checkpoint export as it loads a hub model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rollover.tasks import word_problems as wp

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


LORA_SEED = 7


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    """A checkpoint of a LoRA policy on chat-math whose adapter is not the identity (B != 0)."""
    import torch

    from rollover.trainer.checkpoint import save_checkpoint
    from rollover.trainer.config import Recipe
    from rollover.trainer.policy import Policy

    recipe = Recipe.model_validate({"model": {"path": "builtin:chat-math"},
                                    "train": {"lora": {"enabled": True, "r": 4, "alpha": 8}}})
    policy = Policy(recipe.model, recipe.train.lora, torch.device("cpu"))
    generator = torch.Generator().manual_seed(LORA_SEED)
    with torch.no_grad():  # small enough that the model still answers in its format
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return save_checkpoint(tmp_path_factory.mktemp("chat-lora"), 1, policy, {}, keep=1)


BOUND_CORE = max(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def chat_engine(serving, lora_checkpoint):
    """Bound to one core the way `rollout.engine_cpus` binds an engine (the variable vLLM reads)."""
    before = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(BOUND_CORE)
    try:
        with serving(str(lora_checkpoint)) as eng:
            if before is None:
                del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
            else:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = before
            yield eng
    finally:
        if before is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)


def _threads_and_cores(worker) -> tuple[int, list[int]]:
    import torch

    return torch.get_num_threads(), sorted(os.sched_getaffinity(0))


def test_an_engine_given_cores_runs_its_model_on_them_alone(chat_engine, run):
    """The model runs in the engine core (rollout/cpu_executor.py), bound before it was spawned:
    one thread per named core, on that core; this process keeps its own cores."""
    ((threads, cores),) = run(chat_engine.llm.collective_rpc(_threads_and_cores))
    assert (threads, list(cores)) == (1, [BOUND_CORE])
    assert "OMP_PLACES" not in os.environ and len(os.sched_getaffinity(0)) > 1


def test_vllm_generates_chat_answers_that_stop_on_im_end_and_resume_from_ids(chat_engine, lora_checkpoint, run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollover.rollout.settings import SamplingSettings
    from rollover.tasks.prompts import prompt_ids

    path = lora_checkpoint  # transformers and vLLM both load the export
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


def test_the_lora_export_loads_in_peft_and_matches_the_merged_weights(lora_checkpoint):
    """The checkpoint's adapter, applied by PEFT to the shipped base, is the merged export."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rollover.trainer.builtin.models import resolve_model_path

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 8]])
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:chat-math"), dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
    adapted = PeftModel.from_pretrained(base, str(lora_checkpoint / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(lora_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        adapter_logits, merged_logits = adapted(ids).logits, merged(ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(adapter_logits, merged_logits, atol=1e-4, rtol=1e-4)


def test_scoring_reads_text_without_special_tokens_while_training_keeps_the_ids(chat_engine, lora_checkpoint, run):
    """A group generated and scored by the rollout path: the verifier sees text decoded with
    special tokens skipped, while the trainer's rows keep every id, `<|im_end|>` included, and
    train on it (it is a response token the loss covers)."""
    import itertools

    import torch
    from math_verify import parse, verify
    from transformers import AutoTokenizer

    from rollover.rollout.group_run import GroupRun, GroupRunner
    from rollover.rollout.metrics import StepCounters
    from rollover.rollout.scoring import KeptScores, ScoringPool
    from rollover.rollout.settings import SamplingSettings
    from rollover.rollout.types import Group, Sample
    from rollover.tasks.prompts import prompt_ids
    from rollover.tasks.registry import build_task
    from rollover.tasks.rewards import RewardRunner
    from rollover.trainer.batch import collate, rows_from_groups
    from rollover.trainer.config import load_recipe
    from rollover.trainer.group_scorer import GroupScorer

    recipe = load_recipe(str(ROOT / "recipes" / "grpo_chat.yaml"), [])
    task = build_task(recipe.task)
    rewards = RewardRunner.from_config(recipe.task, task)
    tok = AutoTokenizer.from_pretrained(lora_checkpoint)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    row = wp.read_jsonl(wp.DATA_DIR / wp.TEST_FILE)[0]
    prompt = prompt_ids(row, tok, "chat", wp.SYSTEM_PROMPT)
    group = Group(uid=1, task=row, samples=[Sample(prompt_ids=list(prompt)) for _ in range(4)])
    counter = itertools.count()
    pool = ScoringPool(2)
    runner = GroupRunner(chat_engine, KeptScores(GroupScorer(rewards, recipe.algo, 96), pool),
                         SamplingSettings(temperature=1.0, seed=3), 96,
                         lambda uid, i: f"chat-score-{uid}-{i}-{next(counter)}")
    try:
        assert run(runner.run(GroupRun(group), StepCounters()))
    finally:
        pool.close()
        rewards.close()
    stopped = [s for s in group.samples if s.finish_reason == "stop"]
    assert stopped, [s.finish_reason for s in group.samples]
    for s in group.samples:
        assert s.text == tok.decode(s.response_ids, skip_special_tokens=True)
        assert "<|im_end|>" not in s.text
        # Expected reward: math-verify itself on the tokenizer's own special-token-free decode.
        expected = float(verify(parse(row["answer"]), parse(tok.decode(s.response_ids, skip_special_tokens=True))))
        assert s.reward == expected, (s.text, row["answer"], s.reward)
    for s in stopped:
        assert s.response_ids[-1] == end and "<|im_end|>" in tok.decode(s.response_ids)
    rows = rows_from_groups([group], torch.zeros(1, 4))
    assert [r.response_ids for r in rows] == [s.response_ids for s in group.samples]
    batch = collate(rows, tok.pad_token_id, 0, torch.device("cpu"))
    for i, s in enumerate(group.samples):
        last = len(s.prompt_ids) + len(s.response_ids) - 1  # the stop token's position
        assert batch.input_ids[i, last] == s.response_ids[-1] and batch.response_mask[i, last - 1]
