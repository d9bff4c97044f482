"""The policy: dropout off, LM-head checks, the KL reference, and exact LoRA weight sync."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rollover.trainer.config import LoraConfig, ModelConfig
from rollover.trainer.policy import ModelLoadError, Policy
from rollover.trainer.run import load_checkpoint_weights

from conftest import save_tiny_model


def _ids():
    ids = torch.tensor([[5, 9, 14, 22, 7, 30, 41, 3], [6, 6, 50, 12, 8, 19, 2, 4]])
    return ids, torch.ones_like(ids)


def test_dropout_is_off_even_in_train_mode(tmp_path):
    path = save_tiny_model(tmp_path / "m", attention_dropout=0.5)
    policy = Policy(ModelConfig(path=path, dtype="float32"), LoraConfig())
    ids, attention = _ids()
    policy.model.train()
    first, _ = policy.token_logprobs(ids, attention)
    second, _ = policy.token_logprobs(ids, attention)
    policy.model.eval()
    evaluated, _ = policy.token_logprobs(ids, attention)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, evaluated, rtol=1e-6, atol=1e-6)


def test_logprobs_match_the_models_own_logits_with_an_untied_head(tiny_model):
    policy = Policy(ModelConfig(path=tiny_model, dtype="float32"), LoraConfig())
    ids, attention = _ids()
    logprobs, _ = policy.token_logprobs(ids, attention, temperature=0.7)
    with torch.no_grad():
        logits = policy.model(input_ids=ids, attention_mask=attention).logits[:, :-1] / 0.7
    expected = torch.log_softmax(logits.double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs.double(), expected, rtol=1e-5, atol=1e-5)


def test_softcapped_logits_are_refused_at_start_up(tmp_path):
    path = save_tiny_model(tmp_path / "m", final_logit_softcapping=30.0)
    with pytest.raises(ModelLoadError, match="final_logit_softcapping"):
        Policy(ModelConfig(path=path, dtype="float32"), LoraConfig())


def test_a_head_with_a_bias_is_refused(tiny_model):
    from transformers import AutoModelForCausalLM

    from rollover.trainer.policy import check_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    head = model.get_output_embeddings()
    model.set_output_embeddings(torch.nn.Linear(head.in_features, head.out_features, bias=True))
    with pytest.raises(ModelLoadError, match="bias"):
        check_lm_head(model)


def test_kl_reference_after_a_resume_is_the_starting_model(tiny_model, tmp_path):
    # A "checkpoint" whose weights differ from the starting model's.
    trained = Policy(ModelConfig(path=tiny_model, dtype="float32"), LoraConfig())
    with torch.no_grad():
        for p in trained.model.parameters():
            p.add_(0.5)
    trained.save_pretrained(tmp_path / "ckpt")
    # What run_training does on resume: build the policy, load the checkpoint, then the trainer
    # enables the reference.
    policy = Policy(ModelConfig(path=tiny_model, dtype="float32"), LoraConfig())
    load_checkpoint_weights(policy, tmp_path / "ckpt")
    policy.enable_reference()
    starting = load_file(f"{tiny_model}/model.safetensors")
    reference = policy.reference.state_dict()
    assert starting and set(starting) <= set(reference)
    for name, tensor in starting.items():
        assert torch.equal(reference[name], tensor), name
    live = policy.model.state_dict()
    assert not torch.equal(live["model.embed_tokens.weight"], starting["model.embed_tokens.weight"])


def test_lora_sync_leaves_bfloat16_base_weights_bit_identical(tiny_model):
    policy = Policy(ModelConfig(path=tiny_model, dtype="bfloat16"),
                    LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "up_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    base_before = {n: t.clone() for n, t in policy.model.state_dict().items() if "lora_" not in n}
    for _ in range(50):
        weights = policy.engine_weights()
    for name, tensor in policy.model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, base_before[name]), name
    # The merged weight is W + (alpha / r) * B @ A, computed here in float64.
    layer = policy.model.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight.double()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    expected = (w + (8 / 4) * b @ a).float()
    merged = weights["model.layers.0.self_attn.q_proj.weight"]
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged.float(), expected, rtol=1e-2, atol=1e-3)
    assert not torch.equal(merged, layer.base_layer.weight)
    assert "model.layers.0.mlp.down_proj.weight" in weights  # untouched layers are sent too


def test_merged_lora_weight_with_fan_in_fan_out():
    from rollover.trainer.policy import merged_lora_weight

    base = torch.randn(3, 5)
    a, b = torch.randn(2, 3), torch.randn(5, 2)  # stored transposed (Conv1D layout)
    expected = base.double() + 0.5 * (b.double() @ a.double()).T
    torch.testing.assert_close(merged_lora_weight(base, a, b, 0.5, fan_in_fan_out=True).double(),
                               expected, rtol=1e-5, atol=1e-5)
