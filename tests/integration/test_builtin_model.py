"""builtin:tiny-math: built once, cached, loads in transformers; the install imports cleanly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rollover.trainer.builtin.models import ACCURACY_BAND, make_tokenizer, resolve_model_path

pytestmark = pytest.mark.integration


def test_transformers_and_vllm_import_cleanly():
    # The trap: PyPI's CUDA torchvision beside CPU torch breaks this import.
    code = "from transformers import Qwen2ForCausalLM; import vllm; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def _greedy_accuracy(model, tokenizer, records) -> float:
    """Exact-match accuracy of HF greedy completions (computed here, not by the build code)."""
    from rollover.tasks.arithmetic import extract_answer

    enc = tokenizer([r["question"] for r in records], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=48, do_sample=False)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(extract_answer(t) == int(r["answer"]) for t, r in zip(texts, records)) / len(records)


def test_builtin_model_is_the_shipped_file_and_loads_in_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollover.tasks.arithmetic import arithmetic_record

    path = Path(resolve_model_path("builtin:tiny-math"))
    assert path == Path(__file__).resolve().parents[2] / "trainer" / "builtin" / "shipped" / "tiny-math"
    info = json.loads((path / "build_info.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "qwen2"
    # The tokenizer is character level and round-trips arithmetic text.
    text = "47+85=7+5=12;4+8+1=13;#132"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert ids == make_tokenizer().encode(text)
    # The file is what its build info says: the build's held-out set, scored here, gives the
    # recorded accuracy (exactly on the CPU that built it; other CPUs may flip an answer or two).
    settings = info["settings"]
    held_out = [arithmetic_record(settings["seed"] + 1, i, 1, 3, 2, True) for i in range(settings["eval_size"])]
    assert abs(_greedy_accuracy(model, tokenizer, held_out) - info["held_out_greedy_accuracy"]) <= 0.05
    assert ACCURACY_BAND[0] <= info["held_out_greedy_accuracy"] <= ACCURACY_BAND[1]


def test_the_build_script_reproduces_the_shipped_accuracy_band(tmp_path):
    """Rebuilding from scratch (as the shipped weights were made) lands in the same band."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollover.tasks.arithmetic import arithmetic_record

    out = tmp_path / "tiny-math"
    result = subprocess.run([sys.executable, "-m", "rollover.trainer.builtin.models", "tiny-math",
                             "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    rebuilt = json.loads((out / "build_info.json").read_text())
    shipped = json.loads((Path(resolve_model_path("builtin:tiny-math")) / "build_info.json").read_text())
    assert rebuilt["settings"] == shipped["settings"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    fresh = [arithmetic_record(777, i, 1, 3, 2, True) for i in range(128)]  # neither build saw these
    accuracy = _greedy_accuracy(model, tokenizer, fresh)
    low, high = ACCURACY_BAND
    assert low - 0.1 <= accuracy <= high + 0.1, accuracy  # 128 problems: a few points of noise
    assert low <= rebuilt["held_out_greedy_accuracy"] <= high
