"""The policy: a Hugging Face causal LM (optionally with a LoRA adapter) and its per-token log-probs."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor

from rollover.kernels.logprobs import chunked_logprobs
from rollover.trainer.builtin_model import resolve_model_path
from rollover.trainer.config import LoraConfig, ModelConfig, resolve_dtype

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
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


def _token_logprobs(model, input_ids: Tensor, attention_mask: Tensor, temperature: float):
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return chunked_logprobs(hidden[:, :-1], model.lm_head.weight, input_ids[:, 1:], temperature=temperature)


class Policy:
    """The trainable model, the weights the engine should serve, and log-probs of sequences."""

    def __init__(self, model_cfg: ModelConfig, lora: LoraConfig, device: torch.device | None = None):
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = resolve_dtype(model_cfg.dtype, self.device.type == "cuda")
        model, self.tokenizer, self.path = load_model(model_cfg.path, dtype, self.device)
        if model_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        self.lora = lora.enabled
        if self.lora:
            from peft import LoraConfig as PeftLoraConfig, get_peft_model

            model = get_peft_model(model, PeftLoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        self.model = model

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
        return _token_logprobs(self.base, input_ids, attention_mask, temperature)

    def enable_reference(self) -> None:
        """Keep the starting policy for the KL penalty (LoRA: the base without the adapter)."""
        if not self.lora:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)

    @torch.no_grad()
    def reference_logprobs(self, input_ids: Tensor, attention_mask: Tensor, temperature: float) -> Tensor:
        if self.lora:
            with self.model.disable_adapter():
                return _token_logprobs(self.base, input_ids, attention_mask, temperature)[0]
        return _token_logprobs(self.reference, input_ids, attention_mask, temperature)[0]

    @torch.no_grad()
    def engine_weights(self) -> dict[str, Tensor]:
        """Full weights in checkpoint naming, as the engine loads them (LoRA merged in)."""
        if not self.lora:
            return {name: t.detach() for name, t in self.model.state_dict().items()}
        self.model.merge_adapter()
        try:
            merged = {}
            for name, tensor in self.model.state_dict().items():
                if "lora_" in name:
                    continue
                clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
                merged[clean] = tensor.detach().clone()
            return merged
        finally:
            self.model.unmerge_adapter()

    def save_pretrained(self, folder: Path) -> None:
        """A checkpoint loadable by transformers and vLLM as is (LoRA merged; adapter beside it)."""
        if self.lora:
            self.model.save_pretrained(folder / "adapter")
            self.base.save_pretrained(folder, state_dict=self.engine_weights())
        else:
            self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
