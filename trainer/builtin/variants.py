"""Built-in variants: models derived from a built-in's weights in seconds, with no training.

`builtin:tiny-math-wide` is tiny-math widened (hidden 192 = 3 heads of 64, intermediate 768) with
its vocabulary permuted: the same policy (the same text gets the same probabilities, so it starts
at the same accuracy) with other shapes and other token ids. Heterogeneous swarm tests use it as a
peer that can share text but not weights or token ids.

How the function is kept:
- new hidden dims are zero in the embeddings and in every matrix that writes the residual stream
  (o_proj, down_proj rows), so the residual stream stays zero there;
- RMSNorm over 192 dims of which 64 are zero sees a mean square 128/192 of the original's: the
  norm weights are multiplied by sqrt(128/192) and eps by 128/192, which makes it exact;
- the extra head has zero q/k/v/o weights and biases, the extra MLP units zero gate/up/down;
- token id i becomes (i * id_multiplier + id_offset) mod vocab_size: embedding (and untied
  lm_head) rows move with their token, so logits are permuted, not changed.

Built on first use into `cache_root()`, keyed by the settings and the base weights' hash, under
the same kind of lock as models.py's builds, and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rollover.trainer.builtin import models as bm

WEIGHTS = "model.safetensors"
VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")
CHECK_TEXT = "12+34=4+2=6;1+3=4;#46"  # the build's own function check (tests check more)


@dataclass(frozen=True)
class VariantSettings:
    """What a variant changes in its base; with the base weights' hash it names the cache folder."""

    base: str = "tiny-math"
    hidden_size: int = 192
    intermediate_size: int = 768
    id_multiplier: int = 37  # odd: i -> (i * m + o) mod 2^k is a bijection
    id_offset: int = 11  # odd as well: no id keeps its place (m - 1 even, o odd)
    version: int = 1  # bump when the recipe changes


VARIANTS = {"tiny-math-wide": VariantSettings()}


def id_map(settings: VariantSettings, vocab_size: int) -> list[int]:
    """The new id of every old id (a permutation of range(vocab_size))."""
    m, o = settings.id_multiplier, settings.id_offset
    new = [(i * m + o) % vocab_size for i in range(vocab_size)]
    if sorted(new) != list(range(vocab_size)):
        raise ValueError(f"id_multiplier {m} is not invertible mod {vocab_size}")
    return new


def variant_key(settings: VariantSettings, base: Path) -> str:
    """Hash of the settings and the base's weights file: a changed base gets a fresh build."""
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    with open(base / WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def resolve_variant(name: str, progress: bool = True) -> str:
    """The cached folder of variant `name`, built (once, atomically, under a lock) if missing."""
    settings = VARIANTS[name]
    base = Path(bm.resolve_model_path(bm.BUILTIN_PREFIX + settings.base, progress))
    target = bm.cache_root() / f"{name}-{variant_key(settings, base)}"

    def write(out: Path) -> None:
        info = build_variant(settings, base, out)
        if progress:
            print(f"built {bm.BUILTIN_PREFIX}{name} from {base} in {info['build_seconds']} s")

    return bm.build_once(target, write)


def build_variant(settings: VariantSettings, base: Path, out: Path) -> dict:
    """Write the variant of the model folder `base` into `out`; returns its build info."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    started = time.time()
    config = AutoConfig.from_pretrained(base)
    new_ids = id_map(settings, config.vocab_size)
    wide = _wide_config(config, settings, new_ids)
    model = AutoModelForCausalLM.from_config(wide, dtype=torch.float32)
    state = _wide_state(load_file(base / WEIGHTS), model.state_dict(), config, wide, new_ids)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if wide.tie_word_embeddings else set()):
        raise RuntimeError(f"weights do not fit the wide model: {missing} {unexpected}")
    model.tie_weights()
    model.generation_config = _mapped_generation(GenerationConfig.from_pretrained(base), new_ids)
    tokenizer = _permuted_tokenizer(base, new_ids)
    error = _check(base, model, tokenizer, new_ids)
    if error > 1e-4:
        raise RuntimeError(f"the wide model's logits differ from its base's by {error:.2e}")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {"variant": asdict(settings), "base": str(base), "max_logit_error": error,
            "build_seconds": round(time.time() - started, 2),
            "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}
    (out / "build_info.json").write_text(json.dumps(info, indent=2))
    return info


def _wide_config(config, settings: VariantSettings, new_ids: list[int]):
    """The base's config at the new width, norm eps rescaled, special token ids mapped."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, rest = divmod(settings.hidden_size, head_dim)
    kv_heads, kv_rest = divmod(heads * config.num_key_value_heads, config.num_attention_heads)
    if rest or kv_rest or settings.hidden_size < config.hidden_size:
        raise ValueError(f"hidden {settings.hidden_size} does not widen {config.hidden_size} "
                         f"by whole heads of {head_dim} and whole KV groups")
    wide = config.__class__.from_dict(config.to_dict())
    wide.hidden_size, wide.intermediate_size = settings.hidden_size, settings.intermediate_size
    wide.num_attention_heads, wide.num_key_value_heads = heads, kv_heads
    wide.rms_norm_eps = config.rms_norm_eps * config.hidden_size / settings.hidden_size
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(wide, key, _map_ids(getattr(config, key, None), new_ids))
    return wide


def _wide_state(base: dict, shapes: dict, config, wide, new_ids: list[int]) -> dict:
    """Base tensors moved to the wide shapes: zero padding, permuted vocab rows, rescaled norms."""
    import torch

    scale = math.sqrt(config.hidden_size / wide.hidden_size)
    order = torch.tensor(new_ids).argsort()  # order[new id] = old id
    state = {}
    for key, tensor in base.items():
        if key in VOCAB_KEYS:
            tensor = tensor[order]
        if key.endswith("norm.weight"):
            if tensor.shape != (config.hidden_size,):
                raise ValueError(f"{key}: only hidden-size RMSNorms can be rescaled")
            tensor = tensor * scale
        target = shapes[key]
        if any(old > new for old, new in zip(tensor.shape, target.shape)):
            raise ValueError(f"{key}: {tuple(tensor.shape)} does not fit {tuple(target.shape)}")
        padded = torch.zeros(target.shape, dtype=target.dtype)
        padded[tuple(slice(0, n) for n in tensor.shape)] = tensor
        state[key] = padded
    return state


def _map_ids(value, new_ids: list[int]):
    """A token id, a list of them or None, in the new vocabulary."""
    if value is None:
        return None
    return [new_ids[v] for v in value] if isinstance(value, list) else new_ids[value]


def _mapped_generation(generation, new_ids: list[int]):
    """The base's generation config with its special token ids mapped."""
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if getattr(generation, key, None) is not None:
            setattr(generation, key, _map_ids(getattr(generation, key), new_ids))
    return generation


def _permuted_tokenizer(base: Path, new_ids: list[int]):
    """The base's word-level tokenizer with every token moved to its new id.

    Read from the raw tokenizer.json: AutoTokenizer gives a qwen2 folder Qwen2Tokenizer's
    byte-level pre-tokenizer, which is not the one saved.
    """
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    old = Tokenizer.from_file(str(base / "tokenizer.json"))
    special = json.loads((base / "tokenizer_config.json").read_text())
    vocab = {tok: new_ids[i] for tok, i in old.get_vocab(with_added_tokens=True).items()}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special["unk_token"]))
    core.normalizer, core.pre_tokenizer = old.normalizer, old.pre_tokenizer
    core.decoder = old.decoder
    names = ("pad_token", "bos_token", "eos_token", "unk_token", "padding_side")
    kept = {k: special[k] for k in names if k in special}
    return PreTrainedTokenizerFast(tokenizer_object=core, **kept)


def _check(base: Path, model, tokenizer, new_ids: list[int]) -> float:
    """Largest gap between the base's logits and the wide model's (mapped back) on one text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    base_ids = AutoTokenizer.from_pretrained(base)(CHECK_TEXT, return_tensors="pt")["input_ids"]
    ids = tokenizer(CHECK_TEXT, return_tensors="pt")["input_ids"]
    if ids.tolist()[0] != [new_ids[i] for i in base_ids.tolist()[0]]:
        raise RuntimeError("the permuted tokenizer does not map ids as the weights do")
    model.eval()
    with torch.no_grad():
        want = base_model(input_ids=base_ids).logits
        got = model(input_ids=ids).logits[..., new_ids]  # column new_ids[i] holds old token i
    return float((want - got).abs().max())
