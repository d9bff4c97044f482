"""bench/gpu/gpu_check.py in its CPU mode (`--device cpu --small`): it runs, and its JSON is sane.

Expected values come from the model shapes themselves (parameter and tensor counts written out
from Qwen2's layout), from Adam's step size (about lr per step for a steady gradient), and from
the bucket limit, not from the script's own bookkeeping.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu" / "gpu_check.py"


def qwen2_parameters(vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                     num_key_value_heads, tie_word_embeddings) -> tuple[int, int]:
    """(trainable parameters, tensors in the state dict) of a Qwen2ForCausalLM, from its layout."""
    kv = num_key_value_heads * hidden_size // num_attention_heads
    layer = (hidden_size * hidden_size + hidden_size  # q_proj (with bias)
             + 2 * (hidden_size * kv + kv)  # k_proj, v_proj (with bias)
             + hidden_size * hidden_size  # o_proj
             + 3 * hidden_size * intermediate_size  # gate, up, down
             + 2 * hidden_size)  # two RMSNorms
    head = 0 if tie_word_embeddings else vocab_size * hidden_size
    params = vocab_size * hidden_size + num_hidden_layers * layer + hidden_size + head
    return params, 1 + 12 * num_hidden_layers + 1 + 1  # embed, layers, norm, lm_head (tied too)


def test_cpu_small_mode_writes_sane_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--steps", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["machine"] == socket.gethostname() and result["device"] == "cpu"

    kernels = result["kernels"]
    assert kernels["backends"] == ["torch"] and "no CUDA" in kernels["triton_skipped"]
    (case,) = kernels["cases"]
    for name, diff in case["torch/float32"]["max_abs_diff_vs_naive"].items():
        assert 0 <= diff < 1e-4, name
    for name, diff in case["torch/bfloat16_autocast"]["max_abs_diff_vs_naive"].items():
        assert 0 <= diff < 2e-3, name  # against the same maths on bfloat16 operands

    assert set(result["update"]) == set(result["ipc"]) == {"tiny-tied", "tiny-untied"}
    for name, update in result["update"].items():
        shape = update["config"]
        params, tensors = qwen2_parameters(**{k: shape[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")})
        assert update["parameters"] == params, name
        assert update["master_dtypes"] == update["optimizer_state_dtypes"] == ["float32"]
        assert update["compute_dtype"] == "bfloat16"
        assert update["peak_memory_bytes"] is None and update["seconds_per_step"] > 0
        assert len(update["grad_norms"]) == 2 and all(0 < g < 1e6 for g in update["grad_norms"])
        # One Adam step moves a weight with a steady gradient by lr: float32 masters move ~1 x.
        layer_moves = {n: m for n, m in update["mean_abs_move_over_lr_steps"].items()
                       if ".layers." in n and n.endswith("proj.weight")}
        assert layer_moves and all(0.9 < m <= 1.01 for m in layer_moves.values()), layer_moves
        assert update["first_matrix_moved_fraction"] == 1.0

        ipc = result["ipc"][name]
        assert ipc["tensors"] == ipc["handles"] == tensors
        tied_extra = shape["vocab_size"] * shape["hidden_size"] if shape["tie_word_embeddings"] else 0
        assert ipc["total_staged_bytes"] == sum(ipc["bucket_staged_bytes"]) == 2 * (params + tied_extra)
        assert ipc["largest_tensor_bytes"] == 2 * shape["vocab_size"] * shape["hidden_size"]
        limit = max(ipc["bucket_bytes"], ipc["largest_tensor_bytes"])
        assert ipc["buckets"] == len(ipc["bucket_staged_bytes"]) > 1
        assert all(0 < size <= limit for size in ipc["bucket_staged_bytes"])

    # The sharded update on 2 gloo ranks: float32 masters split between the ranks (each layer's
    # tensors along their first dimension), bfloat16 compute, and weights that move like one process's.
    (fsdp,) = result["fsdp"].values()
    shape = fsdp["config"]
    params, _ = qwen2_parameters(**{k: shape[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")})
    assert fsdp["world_size"] == 2 and fsdp["backend"] == "gloo" and fsdp["compute_dtype"] == "bfloat16"
    assert fsdp["master_dtypes"] == fsdp["optimizer_state_dtypes"] == ["float32"]
    assert fsdp["parameter_bytes_full"] == 4 * params == 4 * fsdp["gathered_parameters"]
    assert 0.45 < fsdp["parameter_bytes_this_rank"] / fsdp["parameter_bytes_full"] < 0.55
    assert len(fsdp["grad_norms"]) == 2 and all(0 < g < 1e6 for g in fsdp["grad_norms"])
    assert 0.9 < fsdp["first_matrix_mean_abs_move_over_lr_steps"] <= 1.01
    assert fsdp["seconds_per_step"] > 0 and fsdp["gather_seconds"] > 0


def test_bad_arguments_are_one_line_errors(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--steps", "0",
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip() == "gpu_check: --steps must be at least 1"
    assert not (tmp_path / "x.json").exists()
