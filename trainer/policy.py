"""The policy: a Hugging Face causal LM (optionally with a LoRA adapter) and its per-token log-probs.

Mixed precision (trainer/precision.py): `model.dtype` names the *compute* dtype (what the
forward passes run in and what the engine serves). Trained parameters are always float32
master weights, so AdamW's state is float32 too and an update of lr 1e-6 is not rounded away;
with a bfloat16/float16 compute dtype the forward passes run under `torch.autocast`, the engine
gets casts of the weights in that dtype (`engine_weights`), and the frozen KL reference is held
in it. With LoRA the frozen base weights are held in the compute dtype (they get no update) and
only the adapter is float32.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import Tensor

from rollover.tasks.errors import UsageError
from rollover.trainer.builtin.models import resolve_model_path
from rollover.trainer.config import LoraConfig, ModelConfig, resolve_dtype
from rollover.trainer.precision import DTYPES, ServedCasts, autocast_to, low_precision
from rollover.trainer.precision import token_logprobs as _token_logprobs


class ModelLoadError(UsageError, RuntimeError):
    """The model named in the recipe cannot be loaded (one line for the user)."""


def load_model(path: str, dtype: str, device: torch.device):
    """A causal LM and its tokenizer from a local folder, a hub id, or a builtin name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        model = AutoModelForCausalLM.from_pretrained(
            resolved, dtype=DTYPES.get(dtype, "auto"), attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model.path '{path}': cannot load ({first})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer, resolved


# Config attributes that change logits after the LM head; our log-probs go through the head's
# weight only (the chunked kernel), so models that use them are refused rather than mis-scored.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def check_lm_head(model) -> None:
    """Refuse, in one line, a causal LM whose logits are not `hidden @ head.weight.T`."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ModelLoadError(f"{type(model).__name__}: no output embedding (LM head) to score tokens with")
    if getattr(head, "bias", None) is not None:
        raise ModelLoadError(f"{type(model).__name__}: LM heads with a bias are not supported "
                             "(log-probs are computed from the head's weight only)")
    for key, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(model.config, key, None)
        if value is not None and value != neutral:
            raise ModelLoadError(f"{type(model).__name__}: config.{key}={value} transforms the logits "
                                 "after the LM head, which rollover's log-probs do not apply; not supported")


def disable_dropout(model) -> None:
    """Dropout off everywhere, in train mode too: old and new log-probs must come from one function.

    Covers nn.Dropout modules (LoRA's included) and the float `*dropout*` attributes that
    attention implementations read (e.g. Qwen2's `attention_dropout`), and the config.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name, value in (config.to_dict().items() if config is not None else ()):
        if "dropout" in name and isinstance(value, float):
            setattr(config, name, 0.0)


def engine_name(name: str) -> str:
    """A PEFT state-dict or module name in plain checkpoint naming (what vLLM loads)."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def merged_lora_weight(base: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
                       fan_in_fan_out: bool = False) -> Tensor:
    """W + scaling * B @ A, computed out of place in float32 and cast to W's dtype.

    Merging into the module and unmerging again is not exact in bfloat16/float16 (the base
    weights drift a little with every sync); this leaves the module untouched.
    """
    delta = lora_b.float() @ lora_a.float() * scaling
    if fan_in_fan_out:
        delta = delta.T
    return (base.float() + delta).to(base.dtype)


class Policy:
    """The trainable model, the weights the engine should serve, and log-probs of sequences.

    `dtype` is the compute dtype's name (as the engine takes it), `compute_dtype` the torch dtype.
    """

    def __init__(self, model_cfg: ModelConfig, lora: LoraConfig, device: torch.device | None = None):
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(model_cfg.dtype, self.device.type == "cuda")
        self.compute_dtype = DTYPES[self.dtype]
        # Trained weights load as float32 masters; LoRA's frozen base in the compute dtype.
        model, self.tokenizer, self.path = load_model(
            model_cfg.path, self.dtype if lora.enabled else "float32", self.device)
        check_lm_head(model)
        disable_dropout(model)
        if model_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        self.lora = lora.enabled
        if self.lora:
            from peft import LoraConfig as PeftLoraConfig, get_peft_model

            model = get_peft_model(model, PeftLoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                target_modules=lora.target_modules, task_type="CAUSAL_LM"), autocast_adapter_dtype=True)
        self.model = model
        wrong = low_precision(self.trainable_parameters())
        if wrong:  # AdamW on low-precision weights rounds RL-sized updates to zero
            raise ModelLoadError(f"trainable parameters must be float32 master weights, found {wrong}")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the forward passes run in: autocast to the compute dtype (none for float32)."""
        return autocast_to(self.compute_dtype, self.device)

    @property
    def base(self):
        """The underlying transformers model (LoRA layers, if any, are inside it)."""
        return self.model.get_base_model() if self.lora else self.model

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def token_logprobs(self, input_ids: Tensor, attention_mask: Tensor,
                       temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """Log-prob and entropy of each next token: [batch, seq-1], position t predicts t+1.

        Goes through the final hidden states and the chunked kernel, so the float32
        tokens x vocabulary log-softmax is never held whole. `temperature` must match the
        engine's (its behaviour log-probs are of the temperature-scaled distribution).
        """
        with self.autocast():
            return _token_logprobs(self.base, input_ids, attention_mask, temperature)

    def enable_reference(self) -> None:
        """Keep the starting policy (`model.path`) for the KL penalty; LoRA: the base, adapter off.

        Loaded afresh from `model.path`, never copied from the live model: after a resume the
        live weights are the checkpoint's, and the reference must stay the starting model. Held
        frozen in the compute dtype (it is never updated, so it needs no float32 master).
        """
        if not self.lora:
            reference, _, _ = load_model(self.path, self.dtype, self.device)
            disable_dropout(reference)
            self.reference = reference.eval().requires_grad_(False)

    @torch.no_grad()
    def reference_logprobs(self, input_ids: Tensor, attention_mask: Tensor, temperature: float) -> Tensor:
        with self.autocast():
            if self.lora:
                with self.model.disable_adapter():
                    return _token_logprobs(self.base, input_ids, attention_mask, temperature)[0]
            return _token_logprobs(self.reference, input_ids, attention_mask, temperature)[0]

    @torch.no_grad()
    def engine_weights(self, cast: bool = True) -> dict[str, Tensor]:
        """Full weights in checkpoint naming and the compute dtype, as the engine serves them.

        The float32 masters are cast (a new tensor each; tied weights stay one tensor), which
        holds a second copy of the weights in the compute dtype until the push ends; `cast=False`
        returns the masters as they are, for a transport that casts bucket by bucket
        (rollout/weights/ipc_buckets.py). LoRA layers are merged out of place (`merged_lora_weight`):
        the module is never touched.
        """
        served = ServedCasts(self.compute_dtype if cast else None)
        if not self.lora:
            return {name: served(t) for name, t in self.model.state_dict().items()}
        from peft.tuners.lora import LoraLayer

        weights = {engine_name(name): served(t) for name, t in self.model.state_dict().items()
                   if "lora_" not in name}
        for name, module in self.model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            base = module.get_base_layer().weight
            merged = base.detach()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    merged = merged_lora_weight(merged, module.lora_A[adapter].weight,
                                                module.lora_B[adapter].weight, module.scaling[adapter],
                                                module.fan_in_fan_out)
            weights[engine_name(f"{name}.weight")] = served(merged)
        return weights

    def save_pretrained(self, folder: Path) -> None:
        """A checkpoint loadable by transformers and vLLM as is (LoRA merged; adapter beside it).

        Full fine-tune: the float32 master weights themselves (exact resume; vLLM and
        transformers cast them to the dtype they are asked for). LoRA: the float32 adapter (the
        trained masters) beside the merged weights in the compute dtype.
        """
        if self.lora:
            self.model.save_pretrained(folder / "adapter")
            self.base.save_pretrained(folder, state_dict=self.engine_weights())
        else:
            self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

