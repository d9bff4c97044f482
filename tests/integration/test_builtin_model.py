"""builtin:tiny-math: built once, cached, loads in transformers; the install imports cleanly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rollover.trainer.builtin_model import make_tokenizer, resolve_model_path

pytestmark = pytest.mark.integration


def test_transformers_and_vllm_import_cleanly():
    # The trap: PyPI's CUDA torchvision beside CPU torch breaks this import.
    code = "from transformers import Qwen2ForCausalLM; import vllm; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_builtin_model_is_cached_and_loads_in_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollover.tasks.arithmetic import arithmetic_record, extract_answer

    path = Path(resolve_model_path("builtin:tiny-math"))
    assert resolve_model_path("builtin:tiny-math") == str(path)  # second call: the cache
    info = json.loads((path / "build_info.json").read_text())
    assert 0.2 <= info["held_out_greedy_accuracy"] <= 0.7  # modest: room for RL
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "qwen2"
    # The tokenizer is character level and round-trips arithmetic text.
    text = "47+85=7+5=12;4+8+1=13;#132"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert ids == make_tokenizer().encode(text)
    # Greedy completions: well-formed answers, and right about as often as the build measured.
    records = [arithmetic_record(99, i, 1, 3, 2, True) for i in range(64)]
    enc = tokenizer([r["question"] for r in records], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=48, do_sample=False)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    answered = [extract_answer(t) for t in texts]
    assert sum(a is not None for a in answered) >= 48
    accuracy = sum(a == int(r["answer"]) for a, r in zip(answered, records)) / len(records)
    assert 0.05 <= accuracy <= 0.9
