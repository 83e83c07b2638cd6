"""Synthetic LoRA adapters in Hugging Face PEFT's layout, for a synthetic model directory.

`write_adapter(out, model_dir)` writes `adapter_config.json` and `adapter_model.safetensors`
with seeded random `A` and `B` matrices (both non-zero, unlike a fresh PEFT adapter whose `B` is
zero), so that every adapter gets a gradient and the adapted model differs from the base.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from exo.testing.synth import random_tensor

MODULES = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def _features(target: str, config: dict) -> tuple[int, int]:
    """`(in, out)` features of projection `target` in a model of `config`."""
    hidden, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, config.get("num_key_value_heads", heads) * head_dim
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }[target]


def write_adapter(
    out: str | Path,
    model_dir: str | Path,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 1,
) -> Path:
    """Writes a PEFT LoRA adapter for every layer of the model in `model_dir`; returns `out`."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    tensors: dict[str, np.ndarray] = {}
    for layer in range(config["num_hidden_layers"]):
        for target in targets:
            features_in, features_out = _features(target, config)
            prefix = f"base_model.model.model.layers.{layer}.{MODULES[target]}.{target}"
            for part, shape in (("A", (rank, features_in)), ("B", (features_out, rank))):
                name = f"{prefix}.lora_{part}.weight"
                tensors[name] = random_tensor(name, shape, seed) * np.float32(5.0)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1))
    return out
