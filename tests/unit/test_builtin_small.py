"""Built-in models: tiny-math keeps its hash and shipped folder; small-math is built into the cache.

No test builds small-math (minutes of CPU); the build is replaced by a stub where needed.
"""

import json
from dataclasses import replace
from pathlib import Path

from rollover.trainer.builtin import models as bm


def test_tiny_math_still_resolves_to_its_shipped_folder():
    shipped = Path(bm.__file__).parent / "shipped" / "tiny-math"
    assert bm.shipped_path("tiny-math") == shipped
    assert bm.resolve_model_path("builtin:tiny-math", progress=False) == str(shipped)


def test_fields_added_later_leave_tiny_math_settings_and_hash_unchanged():
    info = json.loads((bm.SHIPPED_DIR / "tiny-math" / "build_info.json").read_text())
    tiny = bm.BUILTINS["tiny-math"]
    assert tiny.as_dict() == info["settings"]
    assert tiny.key() == "157b71665a41"  # the cache folder's name before those fields existed
    longer_eval = replace(tiny, eval_max_tokens=128)
    assert longer_eval.as_dict() == {**info["settings"], "eval_max_tokens": 128}
    assert longer_eval.key() != tiny.key()


def test_small_math_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROLLOVER_CACHE", str(tmp_path))
    built = []

    def fake_build(name, settings, out, progress):  # writes into the fresh folder it is given
        built.append(name)
        (out / "build_info.json").write_text(json.dumps({"settings": settings.as_dict()}))

    monkeypatch.setattr(bm, "_build", fake_build)
    assert bm.shipped_path("small-math") is None  # too big for git: never shipped
    path = bm.resolve_model_path("builtin:small-math", progress=False)
    assert path == str(tmp_path / f"small-math-{bm.BUILTINS['small-math'].key()}")
    assert bm.resolve_model_path("builtin:small-math", progress=False) == path
    assert built == ["small-math"]


def test_small_math_shape_and_task():
    small = bm.BUILTINS["small-math"]
    assert small.hidden_size // small.heads == 64  # a head size every vLLM backend supports
    h, i = small.hidden_size, small.intermediate_size
    # Per layer: q, k, v with biases, o without; gate, up, down; two RMSNorms. Tied embeddings.
    layer = 3 * (h * h + h) + h * h + 3 * h * i + 2 * h
    assert 10_000_000 <= small.layers * layer + 128 * h + h <= 20_000_000
    assert small.operands < small.operands_max  # a variable operand count: a long tail of lengths
    assert small.as_dict()["operands_max"] == small.operands_max
    assert small.eval_max_tokens >= 6 * len("9+9+9+9+3=39;") + len("#3999996") + 1  # longest + EOS
