"""Synthetic Hugging Face models: real architectures and configs with seeded random weights.

    python -m exo.testing.synth --preset tiny-llama --dtype f32 --out DIR [--seed 0] [--shards 1]

writes `config.json`, safetensors weights (one file, or several with
`model.safetensors.index.json`), a byte-level BPE `tokenizer.json` trained on a built-in text,
`tokenizer_config.json` with the family's chat template, and `generation_config.json`.

    python -m exo.testing.synth --preset tiny-llama --gguf q4_k_m --out FILE.gguf [--seed 0] [--split 1]

writes the same weights and tokenizer as one GGUF file (or `--split` files
`FILE-0000i-of-0000N.gguf`) of that type, as llama.cpp would (see `synth_gguf`; needs `gguf`).

    python -m exo.testing.synth --preset tiny-llama --mlx-quantize 4 [--group-size 64] --dtype bf16 --out DIR
        [--mlx-reference] [--seed 0] [--shards 1]

writes the model directory as `mlx_lm.convert --quantize --q-bits 4 --q-group-size 64` would
from the `--dtype` one: each quantized weight as packed uint32 values with `scales` and `biases`
in that dtype, and `quantization` in `config.json` (see `synth_mlx`; needs `mlx`). With
`--mlx-reference`, the f32 model of the same checkpoint's dequantized weights instead.
The same preset, dtype or type, bits, group size and seed always give the same bytes. LLaVA presets
(`tiny-llava`) are written by `exo.testing.synth_llava`, as one safetensors file.
"""

import argparse
import json
import math
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from exo.testing.corpus import CORPUS

T = TypeVar("T")
R = TypeVar("R")

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' and default_system %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

PHI3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


# Gemma's turns: `user` and `model` (an assistant's turn), each closed by <end_of_turn>.
GEMMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Family:
    """What a model family's tokenizer and chat format look like."""

    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    end_of_turn: str
    chat_template: str
    adds_bos: bool


LLAMA3 = Family(
    special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    bos="<|begin_of_text|>",
    eos="<|end_of_text|>",
    end_of_turn="<|eot_id|>",
    chat_template=LLAMA3_TEMPLATE,
    adds_bos=True,
)
QWEN25 = Family(
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos=None,
    eos="<|endoftext|>",
    end_of_turn="<|im_end|>",
    chat_template=QWEN_TEMPLATE.replace("default_system", "true"),
    adds_bos=False,
)
QWEN3 = Family(
    special_tokens=QWEN25.special_tokens,
    bos=None,
    eos="<|endoftext|>",
    end_of_turn="<|im_end|>",
    chat_template=QWEN_TEMPLATE.replace("default_system", "false"),
    adds_bos=False,
)
PHI3 = Family(
    special_tokens=("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    bos=None,
    eos="<|endoftext|>",
    end_of_turn="<|end|>",
    chat_template=PHI3_TEMPLATE,
    adds_bos=False,
)
# Gemma's special tokens in its own order: <pad> 0, <eos> 1, <bos> 2.
GEMMA = Family(
    special_tokens=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
    bos="<bos>",
    eos="<eos>",
    end_of_turn="<end_of_turn>",
    chat_template=GEMMA_TEMPLATE,
    adds_bos=True,
)


@dataclass(frozen=True)
class Preset:
    """A model shape: `config.json` fields plus the family it belongs to."""

    family: Family
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))


# `tie_word_embeddings` is always written, as real configs do: transformers reads a missing one as
# false, mlx-lm as true (it then drops `lm_head.weight` and reads the embeddings in its place).
def _llama_config(**overrides: Any) -> dict[str, Any]:
    base = {
        "tie_word_embeddings": False,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "rms_norm_eps": 1e-5,
    }
    return base | overrides


QWEN_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def _qwen_config(model_type: str, **overrides: Any) -> dict[str, Any]:
    base = {
        "tie_word_embeddings": False,
        "architectures": [QWEN_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "rms_norm_eps": 1e-6,
    }
    return base | overrides


def _phi3_config(**overrides: Any) -> dict[str, Any]:
    base = {
        "tie_word_embeddings": False,
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "rms_norm_eps": 1e-5,
        "pad_token_id": None,
    }
    return base | overrides


def _gemma_config(model_type: str, **overrides: Any) -> dict[str, Any]:
    base = {
        "tie_word_embeddings": True,
        "architectures": ["Gemma2ForCausalLM" if model_type == "gemma2" else "Gemma3ForCausalLM"],
        "model_type": model_type,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
    }
    return base | overrides


def _deepseek_config(**overrides: Any) -> dict[str, Any]:
    """DeepSeek-V2-Lite's `config.json` (its YaRN scaling, routing and head widths), with `overrides`."""
    base = {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
        "num_experts_per_tok": 6,
        "pretraining_tp": 1,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "greedy",
        "use_cache": True,
        "v_head_dim": 128,
    }
    return base | overrides


def _longrope(pairs: int, seed: int) -> dict[str, Any]:
    """Phi-3.5's `longrope` scaling over `pairs` rotated pairs: short factors near 1, long ones
    growing towards the low frequencies (as the real lists do, but from 2 so that a tiny model's
    few positions feel them), fixed by `seed`."""
    rng = np.random.default_rng(seed)
    short = 1.0 + 0.1 * rng.random(pairs)
    long = np.linspace(2.0, 40.0, pairs) * (1.0 + 0.1 * rng.random(pairs))
    return {"type": "longrope", "short_factor": short.round(4).tolist(), "long_factor": long.round(4).tolist()}


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Qwen3-30B-A3B's mixture of experts: 128 experts of width 768, 8 per token, renormalised.
QWEN3_MOE = {
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
}

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4}

PRESETS: dict[str, Preset] = {
    "llama-3.2-1b": Preset(
        LLAMA3,
        _llama_config(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_ROPE,
            tie_word_embeddings=True,
            max_position_embeddings=131072,
        ),
    ),
    # Llama-3.1-8B's shapes: 16 GB in bf16, the size where a GPU is worth its memory.
    "llama-3.1-8b": Preset(
        LLAMA3,
        _llama_config(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=128256,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_ROPE,
            tie_word_embeddings=False,
            max_position_embeddings=131072,
        ),
    ),
    "qwen2.5-0.5b": Preset(
        QWEN25,
        _qwen_config(
            "qwen2",
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
            max_window_layers=21,
        ),
    ),
    "tiny-llama": Preset(
        LLAMA3,
        _llama_config(
            **TINY,
            num_key_value_heads=2,
            vocab_size=512,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_ROPE,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
        ),
    ),
    # Rows of 256 and 512 values fill K-quant blocks, so its GGUF files hold real Q4_K/Q6_K matrices
    # (tiny-llama's rows of 64 fall back to Q5_0/Q8_0, as llama.cpp does).
    "tiny-llama-k": Preset(
        LLAMA3,
        _llama_config(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_ROPE,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
        ),
    ),
    # 16 layers of tiny-llama's kind: GGUF files whose layer ranges tests fetch apart.
    "tiny-llama-16": Preset(
        LLAMA3,
        _llama_config(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_ROPE,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
        ),
    ),
    "tiny-llama-untied": Preset(
        LLAMA3,
        _llama_config(**TINY, num_key_value_heads=4, vocab_size=512, rope_theta=10000.0, max_position_embeddings=2048),
    ),
    "tiny-mistral": Preset(
        LLAMA3,
        _llama_config(
            **TINY,
            num_key_value_heads=2,
            vocab_size=512,
            rope_theta=1000000.0,
            max_position_embeddings=2048,
            sliding_window=None,
        )
        | {"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
    ),
    "tiny-qwen2": Preset(
        QWEN25,
        _qwen_config(
            "qwen2",
            **TINY,
            num_key_value_heads=2,
            vocab_size=512,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
            max_window_layers=4,
        ),
    ),
    "tiny-qwen3": Preset(
        QWEN3,
        _qwen_config(
            "qwen3",
            **TINY,
            num_key_value_heads=2,
            head_dim=32,
            attention_bias=False,
            vocab_size=512,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            max_position_embeddings=2048,
            max_window_layers=4,
        ),
    ),
    # Phi-3.5-mini's kind: fused qkv_proj and gate_up_proj, LongRoPE whose original context (20)
    # the test prompt passes, so the long factors and the attention factor count, and a sliding
    # window shorter than the prompt.
    "tiny-phi3": Preset(
        PHI3,
        _phi3_config(
            **TINY,
            num_key_value_heads=2,
            vocab_size=512,
            rope_theta=10000.0,
            rope_scaling=_longrope(8, seed=3),
            max_position_embeddings=2048,
            original_max_position_embeddings=20,
            sliding_window=24,
        ),
    ),
    # Phi-4-mini's kind: a partial rotary factor of 0.75, LongRoPE whose switch to
    # the long factors comes during the greedy run (keys cached before it keep the short ones).
    "tiny-phi3-partial": Preset(
        PHI3,
        _phi3_config(
            **TINY,
            num_key_value_heads=2,
            vocab_size=512,
            rope_theta=10000.0,
            partial_rotary_factor=0.75,
            rope_scaling=_longrope(6, seed=4),
            max_position_embeddings=4096,
            original_max_position_embeddings=40,
            sliding_window=None,
        ),
    ),
    # Qwen3-30B-A3B's shapes (experts, widths, heads, vocabulary) with 2 of its 48 layers: 3.7 GB in bf16,
    # of which a token reads the router and 8 of 128 experts per layer (the engine benchmark's MoE preset).
    "qwen3-moe-small": Preset(
        QWEN3,
        _qwen_config(
            "qwen3_moe",
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            attention_bias=False,
            vocab_size=151936,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            max_position_embeddings=40960,
            max_window_layers=2,
            **QWEN3_MOE,
        ),
    ),
    # 8 experts, 2 per token; layer 2 is dense (`mlp_only_layers`), as Qwen3-MoE allows.
    "tiny-qwen3-moe": Preset(
        QWEN3,
        _qwen_config(
            "qwen3_moe",
            **TINY,
            num_key_value_heads=2,
            head_dim=32,
            attention_bias=False,
            vocab_size=512,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            max_position_embeddings=2048,
            max_window_layers=4,
            **(
                QWEN3_MOE
                | {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "mlp_only_layers": [2]}
            ),
        ),
    ),
    # Mixtral's layout (`block_sparse_moe`, experts w1/w2/w3): 4 experts, 2 per token, in every layer.
    "tiny-mixtral": Preset(
        LLAMA3,
        _llama_config(
            **TINY,
            num_key_value_heads=2,
            vocab_size=512,
            rope_theta=1000000.0,
            max_position_embeddings=2048,
            sliding_window=None,
            num_local_experts=4,
            num_experts_per_tok=2,
            router_jitter_noise=0.0,
            router_aux_loss_coef=0.02,
            output_router_logits=False,
        )
        | {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"},
    ),
    # Gemma 2's layout: local (even) and global (odd) layers, a window shorter than the golden prompt,
    # head_dim and query_pre_attn_scalar apart from hidden_size / heads, and caps small enough to bend
    # these random weights' scores and logits (the real ones are 50 and 30).
    "tiny-gemma2": Preset(
        GEMMA,
        _gemma_config(
            "gemma2",
            **TINY,
            num_key_value_heads=2,
            head_dim=32,
            query_pre_attn_scalar=24,
            vocab_size=512,
            rope_theta=10000.0,
            max_position_embeddings=2048,
            sliding_window=12,
            attn_logit_softcapping=0.3,
            final_logit_softcapping=0.5,
            cache_implementation="hybrid",
        ),
    ),
    # Gemma 3's: one global layer in `sliding_window_pattern` (6 in the real models), q/k norms, the
    # local layers' own RoPE base and the global layers' linear RoPE scaling; no soft-capping.
    "tiny-gemma3": Preset(
        GEMMA,
        _gemma_config(
            "gemma3_text",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            query_pre_attn_scalar=256,
            vocab_size=512,
            rope_theta=1000000.0,
            rope_local_base_freq=10000.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            max_position_embeddings=2048,
            sliding_window=12,
            sliding_window_pattern=3,
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            cache_implementation="hybrid",
        ),
    ),
    # DeepSeek-V2-Lite's layout: latent attention without a query bottleneck, YaRN, a dense first
    # layer, 8 routed experts (2 per token) and 2 shared ones.
    "tiny-deepseek-v2-lite": Preset(
        LLAMA3,
        _deepseek_config(
            **TINY,
            vocab_size=512,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        ),
    ),
    # DeepSeek-V2's: a query bottleneck (`q_lora_rank`), 3 experts chosen within the best 2 of 8 groups,
    # their weights scaled by `routed_scaling_factor`.
    "tiny-deepseek-v2": Preset(
        LLAMA3,
        _deepseek_config(
            **TINY,
            vocab_size=512,
            q_lora_rank=24,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=16,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            n_group=8,
            topk_group=2,
            topk_method="group_limited_greedy",
            routed_scaling_factor=16.0,
        ),
    ),
}


def deepseek_attention_tensors(config: dict[str, Any], prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    """DeepSeek-V2's latent attention tensors under `prefix` (`model.layers.N.self_attn`)."""
    hidden, heads, rank = config["hidden_size"], config["num_attention_heads"], config["kv_lora_rank"]
    nope, rope, v = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    q_rank = config["q_lora_rank"]
    plan: list[tuple[str, tuple[int, ...]]] = (
        [(f"{prefix}.q_proj.weight", (heads * (nope + rope), hidden))]
        if q_rank is None
        else [
            (f"{prefix}.q_a_proj.weight", (q_rank, hidden)),
            (f"{prefix}.q_a_layernorm.weight", (q_rank,)),
            (f"{prefix}.q_b_proj.weight", (heads * (nope + rope), q_rank)),
        ]
    )
    return [
        *plan,
        (f"{prefix}.kv_a_proj_with_mqa.weight", (rank + rope, hidden)),
        (f"{prefix}.kv_a_layernorm.weight", (rank,)),
        (f"{prefix}.kv_b_proj.weight", (heads * (nope + v), rank)),
        (f"{prefix}.o_proj.weight", (hidden, heads * v)),
    ]


def expert_tensors(config: dict[str, Any], layer: int) -> list[tuple[str, tuple[int, ...]]] | None:
    """A sparse layer's router and experts as Hugging Face names them; `None` for a dense layer."""
    hidden, model_type = config["hidden_size"], config["model_type"]
    if model_type == "mixtral":
        block, names, experts, inter = (
            "block_sparse_moe",
            ("w1", "w3", "w2"),
            config["num_local_experts"],
            config["intermediate_size"],
        )
    elif model_type == "qwen3_moe":
        step, dense = config.get("decoder_sparse_step", 1), config.get("mlp_only_layers") or []
        if layer in dense or (layer + 1) % step != 0:
            return None
        block, names, experts, inter = (
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            config["num_experts"],
            config["moe_intermediate_size"],
        )
    elif model_type == "deepseek_v2":
        if layer < config["first_k_dense_replace"]:
            return None
        block, names, experts, inter = (
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            config["n_routed_experts"],
            config["moe_intermediate_size"],
        )
    else:
        return None
    p = f"model.layers.{layer}.{block}"
    plan: list[tuple[str, tuple[int, ...]]] = [(f"{p}.gate.weight", (experts, hidden))]
    for e in range(experts):
        gate, up, down = names
        plan += [
            (f"{p}.experts.{e}.{gate}.weight", (inter, hidden)),
            (f"{p}.experts.{e}.{up}.weight", (inter, hidden)),
            (f"{p}.experts.{e}.{down}.weight", (hidden, inter)),
        ]
    if model_type == "deepseek_v2":
        shared = config["n_shared_experts"] * inter
        plan += [
            (f"{p}.shared_experts.gate_proj.weight", (shared, hidden)),
            (f"{p}.shared_experts.up_proj.weight", (shared, hidden)),
            (f"{p}.shared_experts.down_proj.weight", (hidden, shared)),
        ]
    return plan


DTYPES = {"f32": ("F32", "float32"), "bf16": ("BF16", "bfloat16"), "f16": ("F16", "float16")}
TOKENIZER_VOCAB = 400


def tensor_plan(preset: Preset) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, in file order, with its shape."""
    c = preset.config
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads, kv_heads = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    head_dim = c.get("head_dim", hidden // heads)
    qkv_bias = c["model_type"] == "qwen2" or c.get("attention_bias", False)
    plan: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    fused = c["model_type"] == "phi3"
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        qkv = [("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim), ("v_proj", kv_heads * head_dim)]
        if c["model_type"] == "deepseek_v2":
            plan += deepseek_attention_tensors(c, f"{p}.self_attn")
            qkv = []
        elif fused:
            plan.append((f"{p}.self_attn.qkv_proj.weight", ((heads + 2 * kv_heads) * head_dim, hidden)))
            qkv = []
        for proj, out in qkv:
            plan.append((f"{p}.self_attn.{proj}.weight", (out, hidden)))
            if qkv_bias:
                plan.append((f"{p}.self_attn.{proj}.bias", (out,)))
        if c["model_type"] != "deepseek_v2":
            plan.append((f"{p}.self_attn.o_proj.weight", (hidden, heads * head_dim)))
        if c.get("attention_bias", False):
            plan.append((f"{p}.self_attn.o_proj.bias", (hidden,)))
        if c["model_type"] in ("qwen3", "qwen3_moe", "gemma3_text"):
            plan.append((f"{p}.self_attn.q_norm.weight", (head_dim,)))
            plan.append((f"{p}.self_attn.k_norm.weight", (head_dim,)))
        experts = expert_tensors(c, layer)
        if experts is not None:
            plan += experts
        else:
            if fused:
                plan.append((f"{p}.mlp.gate_up_proj.weight", (2 * inter, hidden)))
            else:
                plan.append((f"{p}.mlp.gate_proj.weight", (inter, hidden)))
                plan.append((f"{p}.mlp.up_proj.weight", (inter, hidden)))
            plan.append((f"{p}.mlp.down_proj.weight", (hidden, inter)))
        plan.append((f"{p}.input_layernorm.weight", (hidden,)))
        plan.append((f"{p}.post_attention_layernorm.weight", (hidden,)))
        if c["model_type"] in ("gemma2", "gemma3_text"):
            plan.append((f"{p}.pre_feedforward_layernorm.weight", (hidden,)))
            plan.append((f"{p}.post_feedforward_layernorm.weight", (hidden,)))
    plan.append(("model.norm.weight", (hidden,)))
    if not preset.tied:
        plan.append(("lm_head.weight", (vocab, hidden)))
    return plan


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Normal(0, 0.02) weights; norm weights around 1. Seeded by (seed, name) alone."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= np.float32(0.02)
    if "norm" in name:
        values += np.float32(1.0)
    return values


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns of f32 `values`, rounded to nearest, ties to even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def _encode(values: np.ndarray, dtype: str) -> bytes:
    if dtype == "f32":
        return values.astype("<f4").tobytes()
    if dtype == "f16":
        return values.astype("<f2").tobytes()
    return to_bfloat16_bits(values).astype("<u2").tobytes()


# Bytes per value of the safetensors dtypes these checkpoints hold.
SAFETENSORS_WIDTHS = {"F32": 4, "BF16": 2, "F16": 2, "U32": 4}

StoredTensor = tuple[str, str, tuple[int, ...]]
"""One tensor of a safetensors file: its name, safetensors dtype and shape."""


def write_safetensors(path: Path, layout: list[StoredTensor], data: Iterable[bytes], file_format: str = "pt") -> None:
    """Writes the safetensors format (header length, JSON header, raw bytes): the tensors of
    `layout`, in its order, whose bytes `data` yields in the same order, one tensor at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": file_format}}
    offset = 0
    for name, stored, shape in layout:
        size = math.prod(shape) * SAFETENSORS_WIDTHS[stored]
        header[name] = {"dtype": stored, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    written = 0
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for chunk in data:
            out.write(chunk)
            written += len(chunk)
    if written != offset:
        raise ValueError(f"{path}: the header describes {offset} bytes of tensors, {written} were written")


def stored_size(layout: list[StoredTensor]) -> int:
    """Bytes of tensor data in a safetensors file of `layout`."""
    return sum(math.prod(shape) * SAFETENSORS_WIDTHS[stored] for _, stored, shape in layout)


def in_parallel(items: list[T], work: Callable[[T], R]) -> Iterator[R]:
    """`work` of each item, in order, computed on every core a few at a time (numpy's generators
    release the GIL), so that only a few results are held at once."""
    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(items), workers):
            yield from pool.map(work, items[start : start + workers])


def _write_plain_file(path: Path, plan: list[tuple[str, tuple[int, ...]]], dtype: str, seed: int) -> list[StoredTensor]:
    """One safetensors file of `plan`'s seeded weights in `dtype`; each depends only on (seed, name)."""
    layout = [(name, DTYPES[dtype][0], shape) for name, shape in plan]
    write_safetensors(path, layout, in_parallel(plan, lambda t: _encode(random_tensor(t[0], t[1], seed), dtype)))
    return layout


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def _split_by_layers(plan: list[tuple[str, tuple[int, ...]]], num_files: int, layers: int) -> Iterator[list]:
    """Groups whole layers into `num_files` files; embeddings go first, norm and head last."""
    bounds = np.array_split(np.arange(layers), num_files)
    for index, group in enumerate(bounds):
        wanted = set(group.tolist())
        chunk = []
        for name, shape in plan:
            layer = _layer_of(name)
            first = layer is None and name == "model.embed_tokens.weight" and index == 0
            last = layer is None and name != "model.embed_tokens.weight" and index == num_files - 1
            if first or last or (layer is not None and layer in wanted):
                chunk.append((name, shape))
        yield chunk


FileWriter = Callable[[Path, list[tuple[str, tuple[int, ...]]]], list[StoredTensor]]
"""Writes the tensors of a part of the plan as one safetensors file and returns what it stored."""


def write_weights(preset: Preset, out: Path, num_files: int, write_file: FileWriter) -> None:
    """Writes the preset's weights with `write_file`: `model.safetensors`, or `num_files` files of
    whole layers with `model.safetensors.index.json`."""
    plan = tensor_plan(preset)
    if num_files <= 1:
        write_file(out / "model.safetensors", plan)
        return
    layers = preset.config["num_hidden_layers"]
    if num_files > layers:
        raise ValueError(f"cannot split {layers} layers into {num_files} files")
    weight_map: dict[str, str] = {}
    total = 0
    for index, chunk in enumerate(_split_by_layers(plan, num_files, layers), start=1):
        file_name = f"model-{index:05d}-of-{num_files:05d}.safetensors"
        layout = write_file(out / file_name, chunk)
        weight_map.update({name: file_name for name, _, _ in layout})
        total += stored_size(layout)
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


def train_tokenizer(family: Family) -> Any:
    """A byte-level BPE tokenizer trained on the built-in text, special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=list(family.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    if family.adds_bos and family.bos:
        bos_id = tokenizer.token_to_id(family.bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[(family.bos, bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _write_tokenizer(preset: Preset, out: Path) -> dict[str, int]:
    family = preset.family
    tokenizer = train_tokenizer(family)
    if tokenizer.get_vocab_size() > preset.config["vocab_size"]:
        raise ValueError("the tokenizer is larger than the model's vocabulary")
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in family.special_tokens}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": family.bos,
        "eos_token": family.end_of_turn,
        "pad_token": family.eos,
        "chat_template": family.chat_template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": preset.config["max_position_embeddings"],
        "added_tokens_decoder": {
            str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False}
            for t, i in ids.items()
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    return ids


def write_model(preset: str, out_dir: str | Path, dtype: str = "f32", seed: int = 0, num_shards: int = 1) -> Path:
    """Writes the complete model directory of `preset` to `out_dir` and returns it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    spec = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_metadata(spec, out, dtype)
    write_weights(spec, out, num_shards, lambda path, plan: _write_plain_file(path, plan, dtype, seed))
    return out


def write_metadata(spec: Preset, out: Path, dtype: str, extra_config: dict[str, Any] | None = None) -> None:
    """Writes every file of the model directory but the weights: tokenizer and configs
    (`config.json` with `extra_config`'s fields added)."""
    ids = _write_tokenizer(spec, out)
    family = spec.family
    eos_ids = [ids[family.eos], ids[family.end_of_turn]]
    config = spec.config | {
        "torch_dtype": DTYPES[dtype][1],
        "bos_token_id": ids[family.bos] if family.bos else None,
        "eos_token_id": eos_ids[0],
        "transformers_version": "4.46.0",
    }
    config |= extra_config or {}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos_ids, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


def cached(model_dir: Path, write: Callable[[Path], object]) -> Path:
    """`model_dir`, written by `write` on first use; written aside and renamed, so an interrupted
    run never leaves a half-written model behind."""
    if not model_dir.exists():
        partial = model_dir.with_name(model_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write(partial)
        partial.rename(model_dir)
    return model_dir


def cached_model(preset: str, root: str | Path, dtype: str = "f32", seed: int = 0) -> Path:
    """`root/PRESET-DTYPE`, written on first use (see `cached`)."""
    return cached(Path(root) / f"{preset}-{dtype}", lambda out: write_model(preset, out, dtype=dtype, seed=seed))


def main() -> None:
    from exo.testing.synth_llava import LLAVA_PRESETS

    parser = argparse.ArgumentParser(description="Write a synthetic Hugging Face model directory.")
    parser.add_argument("--preset", required=True, choices=sorted([*PRESETS, *LLAVA_PRESETS]))
    parser.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors files")
    parser.add_argument(
        "--gguf",
        metavar="TYPE",
        help="write a GGUF file of this type at --out instead of a model directory "
        "(f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k, q4_k_m)",
    )
    parser.add_argument("--split", type=int, default=1, help="with --gguf: number of GGUF files")
    parser.add_argument(
        "--mlx-quantize",
        type=int,
        metavar="BITS",
        help="write the model directory as mlx_lm.convert --quantize would: weights in BITS (2, 3, 4, 5, 6 or 8) "
        "with scales and biases in --dtype (see synth_mlx; needs mlx)",
    )
    parser.add_argument("--group-size", type=int, default=64, help="with --mlx-quantize: 32, 64 or 128")
    parser.add_argument(
        "--mlx-reference",
        action="store_true",
        help="with --mlx-quantize: write the f32 model of that checkpoint's dequantized weights instead",
    )
    args = parser.parse_args()
    if args.gguf is not None and args.mlx_quantize is not None:
        parser.error("--gguf and --mlx-quantize write different formats: choose one")
    if args.mlx_reference and args.mlx_quantize is None:
        parser.error("--mlx-reference needs --mlx-quantize")
    try:
        _write(args)
    except ValueError as error:
        parser.error(str(error))


def _write(args: argparse.Namespace) -> None:
    from exo.testing.synth_llava import LLAVA_PRESETS, write_llava_model

    if args.preset in LLAVA_PRESETS:
        if args.gguf is not None or args.mlx_quantize is not None or args.shards != 1:
            raise ValueError(f"{args.preset} is written as one safetensors file only")
        write_llava_model(args.preset, args.out, args.dtype, args.seed)
    elif args.gguf is not None:
        from exo.testing.synth_gguf import write_gguf

        write_gguf(args.preset, args.out, args.gguf.lower(), args.seed, args.split)
    elif args.mlx_quantize is not None:
        from exo.testing.synth_mlx import write_mlx_model, write_mlx_reference

        write = write_mlx_reference if args.mlx_reference else write_mlx_model
        write(args.preset, args.out, args.mlx_quantize, args.group_size, args.dtype, args.seed, args.shards)
    else:
        write_model(args.preset, args.out, args.dtype, args.seed, args.shards)


if __name__ == "__main__":
    main()
