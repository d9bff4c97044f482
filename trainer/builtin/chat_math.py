"""`builtin:chat-math`: a small chat model with a byte-level BPE tokenizer, built like a hub model.

Every other built-in model reads characters from a raw prompt; real instruct models do not. This
one is made the way they are, only small, so the path a real model takes (chat template, special
tokens, BPE merges that do not align with characters, EOS ids that differ from the template's end
token, `#### N` answers scored by math-verify) runs in tests and on a CPU:

- a byte-level BPE tokenizer trained here with Hugging Face `tokenizers` on word-problem text,
  with Qwen2's normalizer and pre-tokenizer (digits split one per token), Qwen-style special
  tokens (`<|endoftext|>` pad, `<|im_start|>`, `<|im_end|>` EOS) and a ChatML Jinja template;
- a Qwen2-architecture model (~2M parameters, tied embeddings); its embedding has a few unused
  rows beyond the tokenizer's vocabulary, as Qwen's have;
- `generation_config.json` ending generation on `<|im_end|>` or `<|endoftext|>`;
- a supervised warm start on chat-formatted word problems (tasks/word_problems.py: system prompt
  and question in, worked solution ending `#### N` then `<|im_end|>` out), stopped on held-out
  greedy accuracy (math-verify scored) as tiny-math is, so RL has room to improve it.

The BPE vocabulary is as large as the text supports: word-problem text has about two hundred
distinct words, so merges run out at 469 tokens whatever size is asked for.

Shipped in `trainer/builtin/shipped/chat-math/` and used as is; rebuilt (and cached, keyed by a hash
of the settings) only when that folder is missing or was made with other settings. Rebuild the
shipped folder with `python -m rollover.trainer.builtin.chat_math --out DIR`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rollover.tasks import word_problems as wp
from rollover.trainer.builtin import models as bm
from rollover.trainer.builtin.warm_start import warm_start

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
PAD, END = "<|endoftext|>", "<|im_end|>"
# ChatML, as Qwen's instruct models use it (without their default system prompt).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
GENERATION_PROMPT = "<|im_start|>assistant\n"


@dataclass(frozen=True)
class ChatSettings:
    """Everything that determines the built model; its hash names the cache folder."""

    hidden_size: int = 192
    intermediate_size: int = 576
    layers: int = 4
    heads: int = 3  # head_dim 64
    vocab_size: int = 512  # embedding rows: the tokenizer's tokens and unused padding rows
    bpe_vocab: int = 4096  # asked of the BPE trainer (the text supports fewer)
    bpe_problems: int = 20000  # word problems the tokenizer is trained on
    max_positions: int = 512
    batch_size: int = 32
    lr: float = 2e-3
    max_steps: int = 3000
    eval_every: int = 50
    eval_size: int = 128  # the first rows of the shipped test file
    eval_max_tokens: int = 64
    target_accuracy: float = 0.30  # stop at the first evaluation at or above this
    min_steps: int = 100
    seed: int = 1234  # model init; the warm start's problems are word_problem(seed, i)
    bf16_autocast: bool = True  # training only; weights, saved model and evaluation stay float32
    version: int = 1  # bump to invalidate caches when the recipe of the build changes

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


CHAT_BUILTINS = {"chat-math": ChatSettings()}
# Held-out greedy accuracy a build must land in: room for RL above, something to reinforce below.
ACCURACY_BAND = (0.20, 0.50)


def resolve_chat(name: str, progress: bool = True) -> str:
    """The shipped folder of `name` if it matches today's settings, else a cached build."""
    settings = CHAT_BUILTINS[name]
    shipped = bm.SHIPPED_DIR / name
    info = shipped / "build_info.json"
    if info.is_file() and json.loads(info.read_text())["settings"] == asdict(settings):
        return str(shipped)
    target = bm.cache_root() / f"{name}-{settings.key()}"

    return bm.build_once(target, lambda out: build_chat_model(settings, out, progress))


def make_chat_tokenizer(settings: ChatSettings):
    """A Qwen2Tokenizer whose byte-level BPE merges are trained on word-problem text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    template = Qwen2Tokenizer()  # Qwen2's normalizer, pre-tokenizer and decoder, empty vocabulary
    core = Tokenizer(models.BPE())
    core.normalizer = template.backend_tokenizer.normalizer
    core.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    core.decoder = template.backend_tokenizer.decoder
    trainer = trainers.BpeTrainer(vocab_size=settings.bpe_vocab, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(_bpe_corpus(settings), trainer)
    merges = [tuple(m) for m in json.loads(core.to_str())["model"]["merges"]]
    return Qwen2Tokenizer(vocab=core.get_vocab(), merges=merges, eos_token=END, pad_token=PAD,
                          unk_token=None, chat_template=CHAT_TEMPLATE,
                          extra_special_tokens=SPECIAL_TOKENS[1:],
                          model_max_length=settings.max_positions, padding_side="left")


def _bpe_corpus(settings: ChatSettings):
    """Chat transcripts' text: role names, system prompt, questions and worked answers."""
    for i in range(settings.bpe_problems):
        row = wp.word_problem(settings.seed, i)
        yield f"system\n{wp.SYSTEM_PROMPT}\nuser\n{row['question']}\nassistant\n{row['answer']}\n"


def _make_model(settings: ChatSettings, tokenizer):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if len(tokenizer) > settings.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size {settings.vocab_size}")
    end, pad = tokenizer.convert_tokens_to_ids(END), tokenizer.convert_tokens_to_ids(PAD)
    config = Qwen2Config(
        vocab_size=settings.vocab_size, hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size, num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads, num_key_value_heads=settings.heads,
        max_position_embeddings=settings.max_positions, tie_word_embeddings=True,
        bos_token_id=pad, eos_token_id=end, pad_token_id=pad, torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[end, pad], pad_token_id=pad,
                                               bos_token_id=pad)
    return model


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    """System prompt and question through the chat template, ending in the generation prompt."""
    messages = [{"role": "system", "content": wp.SYSTEM_PROMPT}, {"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _sft_rows(settings: ChatSettings, excluded: set[str]):
    """Endless warm-start problems (seed stream `settings.seed`), none of the shipped files' questions."""
    index = 0
    while True:
        row = wp.word_problem(settings.seed, index)
        index += 1
        if row["question"] not in excluded:
            yield row


def _batch(rows: list[dict], tokenizer):
    """Prompt + solution + <|im_end|> per row, right-padded; only the response is a label."""
    import torch

    end, pad = tokenizer.convert_tokens_to_ids(END), tokenizer.pad_token_id
    seqs, labels = [], []
    for row in rows:
        prompt = chat_prompt_ids(tokenizer, row["question"])
        answer = tokenizer.encode(row["answer"], add_special_tokens=False) + [end]
        seqs.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask, lab


def chat_greedy_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int = 64) -> float:
    """Share of rows whose greedy chat completion math-verify scores right against `#### N`."""
    import torch

    from rollover.tasks.registry import gold_answer, math_verify_score

    prompts = [chat_prompt_ids(tokenizer, r["question"]) for r in rows]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    hits = [math_verify_score(t, gold_answer(r["answer"])) for t, r in zip(texts, rows)]
    return sum(hits) / len(hits)


def build_chat_model(settings: ChatSettings, out: Path, progress: bool = True) -> dict:
    """Train the tokenizer and the warm start; save both into `out` with build_info.json."""
    import torch

    started = time.time()
    torch.manual_seed(settings.seed)
    tokenizer = make_chat_tokenizer(settings)
    model = _make_model(settings, tokenizer)
    test = wp.read_jsonl(wp.DATA_DIR / wp.TEST_FILE)
    excluded = {r["question"] for r in test + wp.read_jsonl(wp.DATA_DIR / wp.TRAIN_FILE)}
    held_out = test[: settings.eval_size]
    stream = _sft_rows(settings, excluded)
    bf16 = settings.bf16_autocast and bm._native_bf16()

    def report(step: int, loss: float, accuracy: float) -> None:
        if progress:
            print(f"building {bm.BUILTIN_PREFIX}chat-math: step {step} loss {loss:.3f} "
                  f"held-out acc {accuracy:.0%} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)

    step, accuracy, curve = warm_start(
        model, lambda step: _batch([next(stream) for _ in range(settings.batch_size)], tokenizer),
        lambda m: chat_greedy_accuracy(m, tokenizer, held_out, settings.eval_max_tokens),
        lr=settings.lr, max_steps=settings.max_steps, min_steps=settings.min_steps,
        eval_every=settings.eval_every, target_accuracy=settings.target_accuracy, bf16=bf16, on_eval=report)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {"settings": asdict(settings), "steps": step, "held_out_greedy_accuracy": accuracy,
            "held_out": f"first {len(held_out)} rows of tasks/data/{wp.TEST_FILE}",
            "curve": curve, "build_seconds": round(time.time() - started, 1),
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokenizer_tokens": len(tokenizer), "machine": bm._cpu_name(),
            "torch": torch.__version__, "autocast": "bfloat16" if bf16 else "none"}
    (out / "build_info.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    """Build builtin:chat-math into a folder (how the shipped weights were made)."""
    parser = argparse.ArgumentParser(prog="python -m rollover.trainer.builtin.chat_math",
                                     description="Build builtin:chat-math from scratch.")
    parser.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (a timing run)")
    args = parser.parse_args(argv)
    settings = CHAT_BUILTINS["chat-math"]
    if args.max_steps is not None:
        settings = replace(settings, max_steps=args.max_steps)
    target = Path(args.out).resolve()
    bm.write_atomically(target, lambda out: build_chat_model(settings, out))
    info = json.loads((target / "build_info.json").read_text())
    print(f"chat-math: {info['parameters']} parameters, {info['steps']} steps, held-out greedy "
          f"accuracy {info['held_out_greedy_accuracy']:.1%}, {info['build_seconds']} s -> {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
