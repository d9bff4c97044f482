"""GPU check without vLLM: log-prob kernels, a mixed-precision update step, the ipc sender side.

For a machine lent with torch, Triton, transformers and peft only (no vLLM, no registry); a few
minutes on one GPU. Four parts, each recorded in the JSON even when it fails:

* kernels: the chunked log-prob/entropy path with the Triton row kernels against the torch row
  functions and the naive full log-softmax (max abs difference of log-probs, entropies and
  gradients), in float32 and under bfloat16 autocast, with time per forward+backward.
* update: random-weight Qwen2 models with the published Qwen2.5-0.5B and 1.5B dimensions, built
  on the device in float32, updated the way the trainer does it (trainer/precision.py: forward
  under autocast to bfloat16 through the chunked kernel, the GRPO loss of algos/losses.py,
  gradient clipping, AdamW from trainer/optim.py on float32 masters): peak memory
  (`torch.cuda.max_memory_allocated`), time per step, dtypes of weights and AdamW state, and how
  far the weights moved (about lr per step: bfloat16 masters would not move at lr 1e-6).
* ipc: the trainer side of the `ipc` weight push up to the engine boundary: the weights planned
  into buckets (rollout/weights/ipc_buckets.py's planner when vLLM imports, else by size), each bucket
  cast to bfloat16 on the device and given one CUDA-IPC handle per tensor
  (`torch.multiprocessing.reductions.reduce_tensor`), then freed; time and peak extra memory.
* fsdp: the data-parallel trainer's sharded update (`train.world_size`, trainer/distributed/
  shard.py) on every GPU of the machine over NCCL (one rank per GPU; one GPU checks the NCCL
  and mixed-precision path unsharded), on the first shape: time per step, rank 0's peak memory
  and parameter share, float32 masters and AdamW state, the time to gather the whole weights.

    python bench/gpu/gpu_check.py [--out FILE] [--device cuda|cpu] [--small] [--steps N]
    python -m bench.gpu.gpu_check ...          # the same, from the repository root

`--device cpu --small` runs every part a CPU can (no Triton, no CUDA memory counters) with tiny
shapes; tests/unit/test_gpu_check.py runs it. Writes bench/results/gpu_check.json by default.

Self-contained on purpose (it does not use bench/common.py): on a lent machine it runs as a plain
script, where neither `rollover` (not installed) nor `bench` is importable.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import socket
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_check.json"
LR = 1e-6
MIB = 1 << 20

# Published configs of Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B (config.json on the hub).
QWEN = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
            num_key_value_heads=2, tie_word_embeddings=True)
SHAPES = {
    "qwen2.5-0.5b": dict(QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14),
    "qwen2.5-1.5b": dict(QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12),
}
SMALL_SHAPES = {
    "tiny-tied": dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny-untied": dict(vocab_size=200, hidden_size=32, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False),
}


def import_rollover() -> None:
    """Make `rollover.*` importable from this checkout when the package is not installed (the
    lent machine): the repository root is the `rollover` namespace (see pyproject.toml)."""
    try:
        import rollover  # noqa: F401
    except ImportError:
        package = types.ModuleType("rollover")
        package.__path__ = [str(ROOT)]
        sys.modules["rollover"] = package


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> int | None:
    """Reset the peak counter; returns the bytes allocated now (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ---- (a) kernels ----------------------------------------------------------------------------


def kernels_part(device: torch.device, small: bool) -> dict:
    """Triton and torch row functions through the chunked path, against the naive reference."""
    from rollover.kernels.logprobs import chunked_logprobs, naive_logprobs

    cases = [(64, 32, 500)] if small else [(4096, 896, 151936), (4096, 1536, 151936)]
    backends = ["torch"] + (["triton"] if device.type == "cuda" else [])
    out = {"backends": backends, "cases": []}
    if device.type != "cuda":
        out["triton_skipped"] = "no CUDA device (Triton kernels run on CUDA tensors)"
    for tokens, hidden, vocab in cases:
        g = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(tokens, hidden, generator=g, device=device)
        w = torch.randn(vocab, hidden, generator=g, device=device) / math.sqrt(hidden)
        y = torch.randint(0, vocab, (tokens,), generator=g, device=device)
        up = torch.randn(2, tokens, generator=g, device=device)

        def run(fn):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            synchronize(device)
            start = time.perf_counter()
            lp, ent = fn(hh, ww)
            (lp * up[0] + ent * up[1]).sum().backward()
            synchronize(device)
            return (lp.detach(), ent.detach(), hh.grad, ww.grad), time.perf_counter() - start

        case = {"tokens": tokens, "hidden": hidden, "vocab": vocab}
        ref, case["naive_seconds"] = run(lambda a, b: naive_logprobs(a, b, y))
        for backend in backends:
            for mode in ("float32", "bfloat16_autocast"):
                def chunked(a, b, backend=backend, mode=mode):
                    if mode == "float32":
                        return chunked_logprobs(a, b, y, backend=backend)
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        return chunked_logprobs(a, b, y, backend=backend)
                run(chunked)  # warm-up (Triton compiles)
                got, seconds = run(chunked)
                want = ref
                if mode != "float32":  # the same maths on the bfloat16 operands
                    want, _ = run(lambda a, b: naive_logprobs(a.bfloat16(), b.bfloat16(), y))
                case[f"{backend}/{mode}"] = {
                    "seconds": seconds,
                    "max_abs_diff_vs_naive": dict(zip(("logprob", "entropy", "grad_hidden", "grad_weight"),
                                                      (max_abs(a, b) for a, b in zip(got, want)))),
                }
                case.setdefault("_outputs", {})[f"{backend}/{mode}"] = got
        outputs = case.pop("_outputs")
        if "triton" in backends:
            for mode in ("float32", "bfloat16_autocast"):
                case[f"triton_vs_torch/{mode}"] = dict(zip(
                    ("logprob", "entropy", "grad_hidden", "grad_weight"),
                    (max_abs(a, b) for a, b in zip(outputs[f"triton/{mode}"], outputs[f"torch/{mode}"]))))
        out["cases"].append(case)
    return out


# ---- (b) the mixed-precision update step ----------------------------------------------------


def build_model(shape: dict, device: torch.device):
    """A random-weight Qwen2 in float32 (the masters), initialised on `device`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, attention_dropout=0.0, use_cache=False)
    torch.manual_seed(0)
    with device:
        model = Qwen2ForCausalLM(config).to(torch.float32)
    return model


def random_rows(shape: dict, batch: int, seq: int, device: torch.device, seed: int) -> tuple:
    """(token ids, attention mask, response mask, advantages): random rows whose last 3/4 is the
    response, advantages alternating +1/-1."""
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=g, device=device)
    response = torch.zeros(batch, seq - 1, dtype=torch.bool, device=device)
    response[:, seq // 4:] = True
    advantages = torch.tensor([(-1.0) ** i for i in range(batch)], device=device)
    return ids, torch.ones_like(ids), response, advantages


def timed_steps(step, steps: int, device: torch.device) -> tuple[int | None, list[float], float, int | None]:
    """(memory allocated before, each step's gradient norm, seconds per step, peak memory) of
    `steps` calls of `step` after the warm-up."""
    baseline = reset_peak(device)
    synchronize(device)
    began = time.perf_counter()
    norms = [step() for _ in range(steps)]
    synchronize(device)
    return baseline, norms, (time.perf_counter() - began) / steps, peak_bytes(device)


def grpo_update(logprobs_fn, params: list, optimizer, advantages, response) -> torch.Tensor:
    """One on-policy GRPO update of `params` from `logprobs_fn()`; the clipped gradient's norm."""
    from rollover.algos.losses import policy_loss

    logprobs = logprobs_fn()
    old = logprobs.detach()
    loss, _ = policy_loss(logprobs, old, old, advantages, response, loss="grpo", offpolicy="none")
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def update_part(name: str, shape: dict, device: torch.device, small: bool, steps: int,
                checkpointing: bool) -> tuple[dict, object]:
    """Time and peak memory of `steps` updates (after one warm-up) on one model shape."""
    from rollover.trainer.optim import build_optimizer
    from rollover.trainer.precision import autocast_to, token_logprobs

    compute = torch.bfloat16
    model = build_model(shape, device)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, lr=LR, weight_decay=0.0)
    batch, seq = (2, 16) if small else (8, 1024)
    ids, mask, response, advantages = random_rows(shape, batch, seq, device, seed=1)

    def logprobs() -> torch.Tensor:
        with autocast_to(compute, device):
            return token_logprobs(model, ids, mask, 1.0)[0]

    def step() -> float:
        return float(grpo_update(logprobs, params, optimizer, advantages, response))

    step()  # warm-up: kernels compile, AdamW allocates its state
    start = {n: p.detach().clone() for n, p in model.named_parameters()} if small else None
    first = next(p for n, p in model.named_parameters() if "layers." in n and p.dim() == 2)
    first_before = first.detach().clone()
    baseline, norms, seconds, peak = timed_steps(step, steps, device)
    count = sum(p.numel() for p in params)
    moved = (first.detach() - first_before).abs()
    result = {
        "shape": name, "config": shape, "parameters": count, "batch": [batch, seq],
        "gradient_checkpointing": checkpointing, "compute_dtype": str(compute).removeprefix("torch."),
        "master_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        "optimizer_state_dtypes": sorted({str(t.dtype).removeprefix("torch.") for s in optimizer.state.values()
                                          for t in s.values() if t.dim() > 0}),
        "steps": steps, "seconds_per_step": seconds, "grad_norms": norms,
        "peak_memory_bytes": peak, "memory_before_steps_bytes": baseline,
        "peak_bytes_per_parameter": None if peak is None else peak / count,
        # the first layer's first matrix: every entry should move by about lr per Adam step
        "first_matrix_moved_fraction": float((moved > 0).float().mean()),
        "first_matrix_mean_abs_move_over_lr_steps": float(moved.mean()) / (LR * steps),
    }
    if start is not None:
        result["mean_abs_move_over_lr_steps"] = {
            n: float((p.detach() - start[n]).abs().mean()) / (LR * steps) for n, p in model.named_parameters()}
    del optimizer
    return result, model


# ---- (d) the sharded update: FSDP2 over every GPU (2 gloo ranks on a CPU) -------------------


def fsdp_part(name: str, shape: dict, device: torch.device, small: bool, steps: int) -> dict:
    """The data-parallel trainer's update (trainer/distributed/shard.py: one FSDP2 unit per decoder
    layer, float32 masters all-gathered in bfloat16, gradients reduced in float32 and summed) on
    every GPU of the machine with NCCL, or on 2 gloo ranks on a CPU: time per step, peak memory and
    the share of the parameters one rank holds, the master and AdamW dtypes, and the time to gather
    the whole weights (what the push to the engines starts with). Rank 0's figures."""
    world_size = torch.cuda.device_count() if device.type == "cuda" else 2
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rank0.json"
        mp.spawn(fsdp_rank, args=(world_size, port, shape, device.type, small, steps, str(out)), nprocs=world_size)
        result = json.loads(out.read_text())
    return {"shape": name, "config": shape, **result}


def fsdp_rank(rank: int, world_size: int, port: int, shape: dict, device_type: str, small: bool, steps: int,
              out: str) -> None:
    """One rank of `fsdp_part` (spawned): each rank updates on its own rows of the batch."""
    import_rollover()
    from rollover.trainer.distributed.shard import data_parallel_mesh, mixed_precision, shard_model
    from rollover.trainer.optim import build_optimizer

    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=300))
    try:
        model = build_model(shape, device)  # the same seed on every rank: the same weights
        full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        model.train()
        root = shard_model(model, data_parallel_mesh(device), mixed_precision(torch.bfloat16))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, lr=LR, weight_decay=0.0)
        batch, seq = (2, 16) if small else (8, 1024)
        ids, mask, response, advantages = random_rows(shape, batch, seq, device, seed=1 + rank)  # each rank its own

        def step() -> float:
            norm = grpo_update(lambda: root(ids, mask, 1.0)[0], params, optimizer, advantages, response)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

        step()  # warm-up
        first = next(p for n, p in model.named_parameters() if "layers." in n and p.dim() == 2)
        first_before = first.full_tensor().detach().clone()
        baseline, norms, seconds, peak = timed_steps(step, steps, device)
        moved = (first.full_tensor().detach() - first_before).abs()
        synchronize(device)
        began = time.perf_counter()
        gathered = 0
        for p in model.parameters():  # one parameter at a time, cast as the engine is served
            gathered += p.full_tensor().to(torch.bfloat16).numel()
        synchronize(device)
        gather_seconds = time.perf_counter() - began
        local_bytes = sum(p.to_local().numel() * p.element_size() for p in params)
        if rank == 0:
            Path(out).write_text(json.dumps({
                "world_size": world_size, "backend": dist.get_backend(), "batch_per_rank": [batch, seq],
                "compute_dtype": "bfloat16",
                "master_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
                "optimizer_state_dtypes": sorted({str(t.dtype).removeprefix("torch.") for st in optimizer.state.values()
                                                  for t in st.values() if t.dim() > 0}),
                "steps": steps, "seconds_per_step": seconds, "grad_norms": norms,
                "peak_memory_bytes": peak, "memory_before_steps_bytes": baseline,
                "parameter_bytes_full": full_bytes, "parameter_bytes_this_rank": local_bytes,
                "first_matrix_mean_abs_move_over_lr_steps": float(moved.mean()) / (LR * steps),
                "gather_seconds": gather_seconds, "gathered_parameters": gathered,
            }))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---- (c) the ipc sender side ------------------------------------------------------------------


def plan(pairs: list[tuple[str, torch.Tensor]], bucket_bytes: int, dtype: torch.dtype) -> tuple[list, str]:
    """Buckets by rollout/weights/ipc_buckets.py's planner (it needs vLLM's layer groups), else by size."""
    try:
        from rollover.rollout.weights.ipc_buckets import plan_buckets

        return plan_buckets(pairs, bucket_bytes, dtype), "rollout.ipc_buckets.plan_buckets"
    except ImportError:
        buckets, current, used = [], [], 0
        for name, tensor in pairs:
            size = tensor.numel() * dtype.itemsize
            if current and used + size > bucket_bytes:
                buckets.append(current)
                current, used = [], 0
            current.append((name, tensor))
            used += size
        return buckets + ([current] if current else []), "by size (vLLM not importable)"


def ipc_part(model, device: torch.device, bucket_mb: float) -> dict:
    """Cast bucket by bucket to bfloat16 on the device and export one IPC handle per tensor."""
    from torch.multiprocessing.reductions import reduce_tensor

    served = torch.bfloat16
    pairs = list(model.state_dict().items())  # what the trainer pushes (tied names included)
    bucket_bytes = max(1, int(bucket_mb * MIB))
    buckets, planner = plan(pairs, bucket_bytes, served)
    baseline = reset_peak(device)
    synchronize(device)
    began = time.perf_counter()
    handles, bucket_sizes = 0, []
    for bucket in buckets:
        staged = [(n, t.detach().to(device=device, dtype=served).contiguous()) for n, t in bucket]
        exported = [reduce_tensor(t) for _, t in staged]  # (rebuild fn, args) per tensor
        synchronize(device)
        handles += len(exported)
        bucket_sizes.append(sum(t.numel() * t.element_size() for _, t in staged))
        del staged, exported
        if device.type == "cuda":
            torch.cuda.ipc_collect()
    synchronize(device)
    seconds = time.perf_counter() - began
    peak = peak_bytes(device)
    return {
        "planner": planner, "bucket_bytes": bucket_bytes, "buckets": len(buckets), "tensors": len(pairs),
        "handles": handles, "bucket_staged_bytes": bucket_sizes, "total_staged_bytes": sum(bucket_sizes),
        "largest_tensor_bytes": max(t.numel() * served.itemsize for _, t in pairs),
        "seconds": seconds, "gb_per_s": sum(bucket_sizes) / seconds / 1e9 if seconds else None,
        "peak_extra_bytes": None if peak is None else peak - baseline,
    }


# ---- main ---------------------------------------------------------------------------------------


def guarded(results: dict, key: str, fn, *args):
    """Run one part; a failure is recorded (one line and the traceback) and the check goes on."""
    try:
        value = fn(*args)
    except Exception as exc:  # noqa: BLE001 - a GPU check reports every part it can
        results[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(f"{key}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="tiny shapes (seconds, any device)")
    parser.add_argument("--steps", type=int, default=3, help="timed update steps per shape")
    parser.add_argument("--bucket-mb", type=float, default=None, help="ipc bucket size (default 512; small: 0.02)")
    parser.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --device cpu --small", file=sys.stderr)
        return 2
    if args.steps < 1:
        print("gpu_check: --steps must be at least 1", file=sys.stderr)
        return 2
    import_rollover()
    device = torch.device(args.device)
    results: dict = {
        "machine": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "device": args.device, "small": args.small,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "lr": LR,
    }
    try:
        import transformers

        results["transformers"] = transformers.__version__
    except ImportError:
        results["transformers"] = None
    started = time.perf_counter()
    kernels = guarded(results, "kernels", kernels_part, device, args.small)
    if kernels is not None:
        results["kernels"] = kernels
    results["update"], results["ipc"] = {}, {}
    bucket_mb = args.bucket_mb if args.bucket_mb is not None else (0.02 if args.small else 512)
    for name, shape in (SMALL_SHAPES if args.small else SHAPES).items():
        part = guarded(results["update"], name, update_part, name, shape, device, args.small, args.steps,
                       not args.no_checkpointing)
        if part is None:
            continue
        results["update"][name], model = part
        ipc = guarded(results["ipc"], name, ipc_part, model, device, bucket_mb)
        if ipc is not None:
            results["ipc"][name] = ipc
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name, shape = next(iter((SMALL_SHAPES if args.small else SHAPES).items()))
    results["fsdp"] = {}
    fsdp = guarded(results["fsdp"], name, fsdp_part, name, shape, device, args.small, args.steps)
    if fsdp is not None:
        results["fsdp"][name] = fsdp
    results["wall_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    failed = [k for k in ("kernels",) if "error" in results.get(k, {})] + \
        [f"{part}/{k}" for part in ("update", "ipc", "fsdp") for k, v in results[part].items() if "error" in v]
    print(f"gpu_check: wrote {args.out}" + (f"; FAILED parts: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
