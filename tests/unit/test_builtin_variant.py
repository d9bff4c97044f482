"""builtin:tiny-math-wide: other width and token ids than tiny-math, the same policy, built once.

Built (about two seconds) into a temporary cache; vLLM is not started here, but the folder must
hold every file tiny-math's does.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollover.tasks.registry import ArithmeticTask
from rollover.trainer.builtin import models as bm
from rollover.trainer.builtin import variants as bv

WIDE = "builtin:tiny-math-wide"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache root holding one build of the variant."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROLLOVER_CACHE", str(root))
        path = Path(bm.resolve_model_path(WIDE, progress=False))
        yield root, path


@pytest.fixture(scope="module")
def pair(cache):
    """(tokenizer, model) of tiny-math and of the wide variant, float32, eval mode."""
    base = bm.resolve_model_path("builtin:tiny-math", progress=False)
    return [(AutoTokenizer.from_pretrained(p),
             AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval())
            for p in (base, cache[1])]


def new_ids() -> list[int]:
    return bv.id_map(bv.VARIANTS["tiny-math-wide"], 128)


def prompts(count: int, scratchpad: bool) -> list[str]:
    """Real arithmetic texts from the task registry: questions, or questions with solutions."""
    task = ArithmeticTask(seed=7, digits_min=1, digits_max=3, operands=2, scratchpad=True)
    records = task.eval_records(count)
    return [r["question"] + (r["solution"] if scratchpad else "") for r in records]


def test_tokenizer_ids_differ_but_text_round_trips(pair):
    (base_tok, _), (wide_tok, _) = pair
    base, wide = base_tok.encode("12+34="), wide_tok.encode("12+34=")
    assert len(base) == len(wide) == 6
    assert all(a != b for a, b in zip(base, wide))
    assert wide == [new_ids()[i] for i in base]
    assert wide_tok.decode(wide) == base_tok.decode(base) == "12+34="
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(wide_tok, name) == new_ids()[getattr(base_tok, name)]


def test_wide_shapes_config_and_files(cache, pair):
    (_, base), (wide_tok, wide) = pair
    mapping = new_ids()
    assert sorted(mapping) == list(range(128)) and all(i != j for i, j in enumerate(mapping))
    cfg = wide.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (192, 768, 3)
    assert cfg.num_hidden_layers == base.config.num_hidden_layers
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # head_dim kept
    saved = json.loads((cache[1] / "config.json").read_text())
    assert saved["model_type"] == "qwen2" and saved["architectures"] == ["Qwen2ForCausalLM"]
    assert saved["eos_token_id"] == wide_tok.eos_token_id == mapping[base.config.eos_token_id]
    assert saved["pad_token_id"] == wide_tok.pad_token_id
    generation = json.loads((cache[1] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == wide_tok.eos_token_id
    shipped = Path(bm.resolve_model_path("builtin:tiny-math", progress=False))
    assert {p.name for p in shipped.iterdir()} <= {p.name for p in cache[1].iterdir()}


def test_next_token_log_probs_match_tiny_math(pair):
    (base_tok, base), (wide_tok, wide) = pair
    texts = prompts(24, scratchpad=True)
    a = base_tok(texts, return_tensors="pt", padding=True)
    b = wide_tok(texts, return_tensors="pt", padding=True)
    assert torch.equal(a["attention_mask"], b["attention_mask"])
    with torch.no_grad():
        want = base(**a).logits.log_softmax(-1)
        got = wide(**b).logits.log_softmax(-1)[..., new_ids()]  # back to tiny-math's ids
    real = a["attention_mask"].bool()
    assert (want[real] - got[real]).abs().max().item() < 1e-4


def test_greedy_generation_gives_the_same_text(pair):
    texts = prompts(8, scratchpad=False)
    outputs = []
    for tok, model in pair:
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=40, do_sample=False)
        new = out[:, enc["input_ids"].shape[1]:]
        outputs.append(tok.batch_decode(new, skip_special_tokens=True))
    assert outputs[0] == outputs[1]
    assert any("#" in t for t in outputs[0])  # real completions, not empty strings


def test_second_resolve_uses_the_cache(cache, monkeypatch):
    root, path = cache
    monkeypatch.setenv("ROLLOVER_CACHE", str(root))
    stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    def no_rebuild(*args):
        raise AssertionError("rebuilt a cached variant")

    monkeypatch.setattr(bv, "build_variant", no_rebuild)
    assert bm.resolve_model_path(WIDE, progress=False) == str(path)
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamps
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == [path.name]


def test_unknown_builtin_names_the_variant():
    with pytest.raises(ValueError, match="tiny-math-wide"):
        bm.resolve_model_path("builtin:no-such-model")
