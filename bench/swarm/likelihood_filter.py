"""The swarm's likelihood filter: how often does it refuse honest peers, and how often poison?

A node judges a peer's group by how likely its text is under the node's own policy, against a
reference built from the node's own samples (swarm/inbox.py, `Inbox.is_unlikely`). This
measures, on the built-in arithmetic task and models (`recipes/grpo_math.yaml`, HF `generate`
on CPU, no vLLM), the share of groups refused:

  honest      the same model with other seeds; peers after N steps of diverging training; a peer
              of another width and vocabulary (`builtin:tiny-math-wide`), as is and trained;
  poison      every completion in the poisoner's style, half with the right final answer (so the
              group is informative): wrong working before it, irrelevant words before it,
              another task's answer format, long correct-looking padding; and the same with one
              poisoned right answer among a peer's honest wrong ones (`one_in_group`).

Diverging training is offline rejection-sampling fine-tuning: AdamW on the peer's own correct
samples (128 prompts x G), `--diverge-steps` steps of 32 sequences. It moves a peer the way RL on
this task does (toward its own right answers, sharper), cheaply and repeatably; the mean
log-prob gap on the peer's own text (`drift_nats`) says how far it went.

Two rules are measured on the same groups: `before` (the rule before issue 25: the reference is
the own samples' behaviour log-probs, and one completion of G below `likelihood_z` = 6 robust
deviations refuses the group) and `now` (the inbox's rule as it is, its reference scored by the
same judge as peers' text).

    python -m bench.swarm.likelihood_filter [--prompts 96] [--diverge-steps 100,400] [--seed 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, machine, save_json

RECIPE = ROOT / "recipes/grpo_math.yaml"
OLD_Z, OLD_MIN_REFERENCE, OLD_FLOOR = 6.0, 16, 0.05  # swarm.likelihood_z and the inbox before issue 25
POISONS = ("wrong_working", "irrelevant_words", "other_task", "padding")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=96, help="groups per setting")
    p.add_argument("--reference-prompts", type=int, default=32, help="own groups the reference is built from")
    p.add_argument("--diverge-steps", default="100,400", help="comma-separated training steps of the diverged peers")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate of the diverging training")
    p.add_argument("--seed", type=int, default=1,
                   help="sampling and training seed (the thresholds were chosen on a run with seed 0, 48 prompts)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=RESULTS / "likelihood_filter.json")
    p.add_argument("--dump", type=Path, help="also write every judged group's scores here (to study rules)")
    args = p.parse_args(argv)
    try:
        args.diverge_steps = [int(s) for s in args.diverge_steps.split(",") if s.strip()]
    except ValueError:
        p.error(f"--diverge-steps: {args.diverge_steps!r} is not a list of integers")
    if args.prompts < 1 or args.reference_prompts < 2 or any(s < 1 for s in args.diverge_steps):
        p.error("--prompts, --reference-prompts and --diverge-steps must be positive (reference >= 2)")
    return args


# ---- models and generation -------------------------------------------------------------------------

def load_policy(recipe, path: str):
    import torch

    from rollover.trainer.policy import Policy

    return Policy(recipe.model.model_copy(update={"path": path}), recipe.train.lora, torch.device("cpu"))


def generate(policy, recipe, records: list[dict], seed: int, batch_prompts: int = 16) -> list[dict]:
    """G sampled completions per record (the recipe's temperature and max_tokens), with each
    completion's behaviour mean log-prob (the sampler's processed log-probs, EOS included)."""
    import torch

    from rollover.tasks.prompts import prompt_ids

    tok, rollout = policy.tokenizer, recipe.rollout
    out: list[dict] = []
    torch.manual_seed(seed)
    for start in range(0, len(records), batch_prompts):
        chunk = records[start:start + batch_prompts]
        prompts = [prompt_ids(r, tok, recipe.task.prompt_format, recipe.task.system_prompt) for r in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            gen = policy.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=rollout.temperature, top_k=0,
                top_p=1.0, max_new_tokens=rollout.max_tokens, num_return_sequences=rollout.group_size,
                output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id)
        new = gen.sequences[:, width:]
        logprobs = torch.stack([s.float().log_softmax(-1) for s in gen.scores], dim=1)  # [n, T, V]
        chosen = logprobs.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        for row in range(new.shape[0]):
            tokens = new[row].tolist()
            length = tokens.index(tok.eos_token_id) + 1 if tok.eos_token_id in tokens else len(tokens)
            record_index = row // rollout.group_size
            if row % rollout.group_size == 0:
                out.append({"record": chunk[record_index], "texts": [], "behaviour": []})
            out[-1]["texts"].append(tok.decode(tokens[:length], skip_special_tokens=True))
            out[-1]["behaviour"].append(float(chosen[row, :length].mean()))
    return out


def greedy_accuracy(policy, recipe, records: list[dict], task) -> float:
    quiet = recipe.model_copy(deep=True)
    quiet.rollout.group_size, quiet.rollout.temperature = 1, 1e-4
    groups = generate(policy, quiet, records, seed=0, batch_prompts=64)
    return sum(task.score(g["texts"][0], g["record"]) for g in groups) / len(groups)


def diverge(policy, recipe, task, records: list[dict], steps: int, lr: float, seed: int) -> None:
    """Rejection-sampling fine-tuning in place: AdamW on the policy's own correct samples."""
    import torch

    from rollover.tasks.prompts import prompt_ids

    tok = policy.tokenizer
    rows = []
    for group in generate(policy, recipe, records, seed):
        prompt = prompt_ids(group["record"], tok, recipe.task.prompt_format, recipe.task.system_prompt)
        for text in group["texts"]:
            if task.score(text, group["record"]) > 0:
                response = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                rows.append((prompt, response))
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=lr)
    policy.model.train()
    for _ in range(steps):
        batch = rng.sample(rows, min(32, len(rows)))
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, r) in enumerate(batch):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
            mask[i, :len(p) + len(r)] = 1
        loss = policy.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.model.eval()


# ---- poison ---------------------------------------------------------------------------------------

def poison_text(kind: str, record: dict, answer: int, rng: random.Random) -> str:
    """A completion in a poisoner's style ending in `answer` (right or wrong)."""
    from rollover.tasks import arithmetic

    numbers = arithmetic.question_numbers(record["question"])
    if kind == "wrong_working":  # well-formed steps of the wrong sums
        steps = "".join(f"{rng.randint(0, 9)}+{rng.randint(0, 9)}={rng.randint(0, 18)};" for _ in numbers[:1] * 3)
        return f"{steps}#{answer}"
    if kind == "irrelevant_words":
        return rng.choice(["Let me think about this.", "trust me, it is", "The answer is clearly",
                           "as everyone knows,"]) + f" #{answer}"
    if kind == "other_task":  # a GSM8K-style worked answer, then this task's answer marker
        a, b = numbers[0], numbers[-1]
        return f"She has {a} apples and buys {b} more, so {a} + {b} = {answer}.\n#### {answer}\n#{answer}"
    if kind == "padding":  # the right working, padded with more correct-looking steps
        pad = "0+0=0;" * rng.randint(2, 4)
        return pad + arithmetic.scratchpad(numbers) + f"#{answer}"
    raise ValueError(kind)


def poison_groups(kind: str, records: list[dict], group_size: int, seed: int) -> list[dict]:
    """All G completions poisoned, half with the right answer (the group is informative)."""
    rng = random.Random(seed)
    groups = []
    for record in records:
        answer = int(record["answer"])
        texts = [poison_text(kind, record, answer if i % 2 == 0 else answer + rng.randint(1, 9), rng)
                 for i in range(group_size)]
        groups.append({"record": record, "texts": texts})
    return groups


def one_in_group(kind: str, honest: list[dict], seed: int) -> list[dict]:
    """A peer's honest groups with one poisoned right answer in place of one completion, and every
    other completion's answer made wrong (so the poison alone earns the positive advantage)."""
    rng = random.Random(seed)
    out = []
    for group in honest:
        answer = int(group["record"]["answer"])
        texts = [t.split("#")[0] + f"#{answer + rng.randint(1, 9)}" for t in group["texts"]]
        texts[0] = poison_text(kind, group["record"], answer, rng)
        out.append({"record": group["record"], "texts": texts})
    return out


# ---- judging ----------------------------------------------------------------------------------------

def judge_groups(judge, groups: list[dict]) -> list[dict]:
    """Each group as the node sees it: rebuilt and re-scored by our judge, then its likelihoods.
    Uninformative groups are refused before the likelihood test; they are kept aside."""
    judged = []
    for g in groups:
        group = judge.build_group(g["record"], g["texts"], "peer")
        rewards = group.rewards
        if max(rewards) == min(rewards):
            continue
        judged.append({"values": judge.mean_logprobs(group), "rewards": rewards})
    return judged


def old_rule(reference: list[float], values: list[float]) -> bool:
    """The rule before issue 25: any completion below OLD_Z robust deviations of the reference."""
    if len(reference) < OLD_MIN_REFERENCE:
        return False
    median = statistics.median(reference)
    scale = max(1.4826 * statistics.median(abs(v - median) for v in reference), OLD_FLOOR)
    return any((v - median) / scale < -OLD_Z for v in values)


def rates(judged: list[dict], behaviour_reference: list[float], judged_reference: list[float]) -> dict[str, Any]:
    """Shares of `judged` refused by the rule before issue 25 and by the inbox's rule now."""
    from rollover.swarm.config import SwarmConfig
    from rollover.swarm.inbox import Inbox
    from rollover.swarm.records import Caps
    from rollover.tasks.registry import build_task
    from rollover.trainer.config import load_recipe

    cfg = SwarmConfig()
    box = Inbox(build_task(load_recipe(RECIPE).task), Caps(), cfg.likelihood_z,
                likelihood_z_each=cfg.likelihood_z_each, likelihood_floor=cfg.likelihood_floor)
    box.note_reference(judged_reference)
    before = sum(old_rule(behaviour_reference, j["values"]) for j in judged)
    now = sum(box.is_unlikely(j["values"], j["rewards"]) for j in judged)
    n = max(1, len(judged))
    return {"groups": len(judged), "refused_before": round(before / n, 4), "refused_now": round(now / n, 4)}


def judge_for(policy, recipe, task):
    from rollover.trainer.external import LocalJudge

    return LocalJudge(recipe, policy, lambda group: [task.score(s.text, group.task) for s in group.samples])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch

    from rollover.tasks.registry import build_task
    from rollover.trainer.config import load_recipe
    from rollover.swarm.config import SwarmConfig

    # One thread: on a small shared CPU, two spin-waiting OpenMP threads made decoding 4x slower.
    torch.set_num_threads(args.threads)
    recipe = load_recipe(RECIPE)
    task = build_task(recipe.task)
    cfg = SwarmConfig()
    n, r = args.prompts, args.reference_prompts
    records = lambda first, count: [task.record(i) for i in range(first, first + count)]  # noqa: E731
    eval_records = task.eval_records(128)

    base = load_policy(recipe, "builtin:tiny-math")
    wide = load_policy(recipe, "builtin:tiny-math-wide")
    models = {"tiny-math": base, "tiny-math-wide": wide}
    for steps in args.diverge_steps:
        for name, start in (("tiny-math", base), ("tiny-math-wide", wide)):
            peer = copy.deepcopy(start)
            diverge(peer, recipe, task, records(20_000, 128), steps, args.lr, args.seed + steps)
            models[f"{name}+{steps}steps"] = peer
    # What each model publishes: G completions of the same prompts (other prompts than the references').
    published = {name: generate(m, recipe, records(10_000, n), args.seed + 1) for name, m in models.items()}
    result: dict[str, Any] = {
        "benchmark": "likelihood_filter", "machine": machine(),
        "args": {"prompts": n, "reference_prompts": r, "diverge_steps": args.diverge_steps, "seed": args.seed}, "recipe": str(RECIPE.relative_to(ROOT)),
        "group_size": recipe.rollout.group_size, "temperature": recipe.rollout.temperature,
        "rule_now": {"likelihood_z": cfg.likelihood_z, "likelihood_z_each": cfg.likelihood_z_each,
                     "likelihood_floor": cfg.likelihood_floor},
        "rule_before": {"likelihood_z": OLD_Z, "floor": OLD_FLOOR, "min_reference": OLD_MIN_REFERENCE},
        "diverging_training": {"kind": "rejection-sampling fine-tuning (AdamW on own correct samples)",
                                                  "lr": args.lr, "batch_sequences": 32},
        "models": {}, "judges": {}}
    for name, m in models.items():
        own_scores = [v for g in published[name] for v in g["behaviour"]]
        result["models"][name] = {"greedy_accuracy": round(greedy_accuracy(m, recipe, eval_records, task), 4),
                                  "own_text_median_logprob": round(statistics.median(own_scores), 4)}
    raw: dict[str, Any] = {}
    judges = ["tiny-math"] + [f"tiny-math+{max(args.diverge_steps)}steps"]
    for judge_name in judges:
        policy = models[judge_name]
        judge = judge_for(policy, recipe, task)
        own = generate(policy, recipe, records(0, r), args.seed)  # its own samples: the reference
        behaviour = [v for g in own for v in g["behaviour"]]
        judged = [v for g in own for v in judge.mean_logprobs(judge.build_group(g["record"], g["texts"], "own"))]
        table: dict[str, Any] = {
            "reference": {"samples": len(judged), "behaviour_median": round(statistics.median(behaviour), 4),
                          "judged_median": round(statistics.median(judged), 4),
                          "median_gap_judged_minus_behaviour": round(statistics.median(
                              j - b for j, b in zip(judged, behaviour)), 5)},
            "honest": {}, "poison": {}, "one_in_group": {}}
        raw[judge_name] = {"behaviour_reference": behaviour, "judged_reference": judged}

        def measure(name: str, groups: list[dict], kind: str) -> None:
            scored = raw[judge_name][f"{kind}/{name}"] = judge_groups(judge, groups)
            table[kind][name] = rates(scored, behaviour, judged)
            print(judge_name, kind, name, table[kind][name], flush=True)

        measure("same_model_other_seed", generate(policy, recipe, records(10_000, n), args.seed + 2), "honest")
        for name in models:
            if name != judge_name:
                measure(f"peer_{name}", published[name], "honest")
        for kind in POISONS:
            measure(kind, poison_groups(kind, records(12_000, n), recipe.rollout.group_size, args.seed), "poison")
            measure(kind, one_in_group(kind, published[judge_name], args.seed), "one_in_group")
        result["judges"][judge_name] = table
    result["bench_wall_s"] = round(time.perf_counter() - started, 1)
    result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    save_json(result, args.out)
    if args.dump:
        save_json(raw, args.dump)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
