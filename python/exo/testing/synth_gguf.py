"""GGUF files of the synthetic presets, written as llama.cpp's `convert_hf_to_gguf.py` (and, for
the K-quant mixes, `llama-quantize`) would write the same Hugging Face model.

The weights are the safetensors preset's own seeded f32 values; the tokenizer is its byte-level
BPE, stored as `tokenizer.ggml.*` metadata. The same preset, type and seed give the same bytes.
Needs the `gguf` package (its writer and its numpy quantizers) and, for the K-quants, which
gguf-py cannot quantize, the built `exo._core` (candle's quantizers).
"""

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as FileType

from exo.testing.synth import LLAMA3, PRESETS, Preset, random_tensor, tensor_plan, write_metadata

# A requested type: what 2-D weights are stored as, and the `general.file_type` it gives. A plain
# type stores every matrix in it (llama-quantize's Q3_K_S/Q4_K_S/Q5_K_S mixes, whose file types
# they borrow, differ in a few matrices); q4_k_m is llama-quantize's Q4_K_M mix.
GGUF_TYPES: dict[str, tuple[Q, FileType]] = {
    "f32": (Q.F32, FileType.ALL_F32),
    "f16": (Q.F16, FileType.MOSTLY_F16),
    "bf16": (Q.BF16, FileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, FileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, FileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, FileType.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, FileType.MOSTLY_Q5_0),
    "q5_1": (Q.Q5_1, FileType.MOSTLY_Q5_1),
    "q2_k": (Q.Q2_K, FileType.MOSTLY_Q2_K),
    "q3_k": (Q.Q3_K, FileType.MOSTLY_Q3_K_S),
    "q4_k": (Q.Q4_K, FileType.MOSTLY_Q4_K_S),
    "q5_k": (Q.Q5_K, FileType.MOSTLY_Q5_K_S),
    "q6_k": (Q.Q6_K, FileType.MOSTLY_Q6_K),
    "q4_k_m": (Q.Q4_K, FileType.MOSTLY_Q4_K_M),
}

# gguf-py quantizes these; the K-quants go through candle (`exo._core.quantize`).
_NUMPY_QUANTIZED = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}

# llama-quantize's replacement for a K-quant whose rows do not fill 256-value blocks. It gives
# Q2_K and Q3_K IQ4_NL, which candle does not read: Q4_0, the other 4-bit type of 32-value
# blocks, stands in for it.
_ROW_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}

# llama.cpp's architecture of each `model_type` (Mistral and Mixtral are stored as `llama`).
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "deepseek_v2": "deepseek2",
}

# Hugging Face name parts → GGUF name parts (gguf-py's tensor map for these architectures).
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.kv_b_proj": "attn_kv_b",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
# Gemma's norms around attention and MLP (its `post_attention_layernorm` follows the attention).
_GEMMA_NORMS = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# An expert's projection → the stacked tensor of its layer's experts (Mixtral's w1, w3, w2 are
# gate, up and down).
_EXPERT_NAMES = {
    "gate_proj": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
    "w1": "ffn_gate_exps",
    "w3": "ffn_up_exps",
    "w2": "ffn_down_exps",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

# llama.cpp's token types.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the file: its GGUF name, where its values come from, shape and type."""

    name: str
    # The safetensors names of its values (a layer's experts, stacked; one name otherwise);
    # empty for the converter's generated tensors (`rope_freqs`, `rope_factors_*`).
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    qtype: Q

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def gguf_name(hf_name: str, architecture: str = "llama") -> str:
    """The GGUF name of a Hugging Face tensor name in a file of llama.cpp's `architecture`
    (`model.layers.3.mlp.up_proj.weight` → `blk.3.ffn_up.weight`); an expert's weight is named
    by the stacked tensor that holds it (`model.layers.3.mlp.experts.5.up_proj.weight` →
    `blk.3.ffn_up_exps.weight`)."""
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    _, _, layer, part = stem.split(".", 3)
    if ".experts." in part:
        return f"blk.{layer}.{_EXPERT_NAMES[part.rsplit('.', 1)[1]]}.{suffix}"
    if architecture.startswith("gemma") and part in _GEMMA_NORMS:
        return f"blk.{layer}.{_GEMMA_NORMS[part]}.{suffix}"
    return f"blk.{layer}.{_LAYER_NAMES[part]}.{suffix}"


def expert_of(hf_name: str) -> int | None:
    """The expert whose weight `hf_name` is (`...experts.5.up_proj.weight` → 5); `None` for others."""
    if ".experts." not in hf_name:
        return None
    return int(hf_name.split(".experts.", 1)[1].split(".", 1)[0])


def architecture(spec: Preset) -> str:
    """llama.cpp's architecture of a preset."""
    return ARCHITECTURES[spec.config["model_type"]]


def _use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get more bits in Q4_K_M:
    the first and last eighth, and every third layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _experts(spec: Preset) -> int:
    """Routed experts per sparse layer (0 for a dense model)."""
    c = spec.config
    return c.get("num_local_experts") or c.get("num_experts") or c.get("n_routed_experts") or 0


def _q4_k_m_type(name: str, spec: Preset) -> Q:
    """llama-quantize's type for a matrix of a Q4_K_M file (before the row-size fallback)."""
    layers, eight_experts = spec.config["num_hidden_layers"], _experts(spec) == 8
    if name == "output.weight" or (spec.tied and name == "token_embd.weight"):
        return Q.Q6_K
    # "For the 8-expert model, bumping this to Q8_0 trades just ~128MB".
    if eight_experts and name.endswith((".attn_k.weight", ".attn_v.weight")):
        return Q.Q8_0
    if eight_experts and name.endswith(".attn_output.weight"):
        return Q.Q5_K
    if name.endswith(".attn_qkv.weight"):
        return Q.Q5_K
    more_bits = name.endswith((".attn_v.weight", ".ffn_down.weight", ".ffn_down_exps.weight"))
    if more_bits and _use_more_bits(int(name.split(".")[1]), layers):
        return Q.Q6_K
    return Q.Q4_K


def _matrix_type(name: str, cols: int, ggml_type: str, spec: Preset) -> Q:
    wanted = GGUF_TYPES[ggml_type][0]
    if ggml_type == "q4_k_m":
        wanted = _q4_k_m_type(name, spec)
        # llama-quantize gives `output` Q8_0 outright when its rows do not fill K blocks.
        if wanted == Q.Q6_K and name in ("output.weight", "token_embd.weight") and cols % gguf.QK_K:
            return Q.Q8_0
    if cols % gguf.GGML_QUANT_SIZES[wanted][0] == 0:
        return wanted
    fallback = _ROW_FALLBACK.get(wanted, Q.F16)
    # Both tools end at F16 when even the fallback's blocks do not fit (the converter goes
    # straight there for Q8_0).
    return fallback if cols % gguf.GGML_QUANT_SIZES[fallback][0] == 0 else Q.F16


def _stored_type(name: str, shape: tuple[int, ...], ggml_type: str, spec: Preset) -> Q:
    """The converter keeps vectors, norms and the MoE router in F32 (llama-quantize leaves them so)."""
    if len(shape) == 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return Q.F32
    return _matrix_type(name, shape[-1], ggml_type, spec)


def _has_llama3_rope(spec: Preset) -> bool:
    scaling = spec.config.get("rope_scaling") or {}
    return scaling.get("rope_type") == "llama3"


def _has_longrope(spec: Preset) -> bool:
    scaling = spec.config.get("rope_scaling") or {}
    return spec.config["model_type"] == "phi3" and scaling.get("type", scaling.get("rope_type")) in ("longrope", "su")


def _head_dim(spec: Preset) -> int:
    c = spec.config
    return c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])


def _rope_dims(spec: Preset) -> int:
    """The rotated width per head (Phi-3's converter: `int(partial * hidden) // heads`)."""
    c = spec.config
    if c["model_type"] == "phi3":
        return int(c.get("partial_rotary_factor", 1.0) * c["hidden_size"]) // c["num_attention_heads"]
    return _head_dim(spec)


def gemma3_vocab(tokenizer_json: dict[str, Any]) -> int:
    """The rows Gemma 3's converter keeps of the embedding: the tokenizer's vocabulary plus its
    added tokens, counted as it counts them (`len(model.vocab) + len(added_tokens)`)."""
    return len(tokenizer_json["model"]["vocab"]) + len(tokenizer_json["added_tokens"])


def tensor_layout(spec: Preset, ggml_type: str, vocab: int | None = None) -> list[_Tensor]:
    """Every tensor of the GGUF file, in file order: the converter's generated tensors first
    (`rope_freqs` for Llama-3 rope scaling, Phi-3's `rope_factors_long`/`_short`), then the
    checkpoint's, each layer's experts stacked into one `[experts, rows, cols]` tensor per
    projection where its first expert stood. `vocab` cuts the embedding's rows (Gemma 3)."""
    layout = []
    if _has_llama3_rope(spec):
        layout.append(_Tensor("rope_freqs.weight", (), (_head_dim(spec) // 2,), Q.F32))
    if _has_longrope(spec):
        for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
            layout.append(_Tensor(name, (), (_rope_dims(spec) // 2,), Q.F32))
    arch = architecture(spec)
    stacks: dict[str, list[str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for hf_name, shape in tensor_plan(spec):
        name = gguf_name(hf_name, arch)
        if name == "token_embd.weight" and vocab is not None:
            shape = (vocab, *shape[1:])
        if name.endswith(".attn_kv_b.weight") and arch == "deepseek2":
            for part, part_shape in zip(("attn_k_b", "attn_v_b"), _kv_b_shapes(spec), strict=True):
                part_name = name.replace("attn_kv_b", part)
                layout.append(
                    _Tensor(part_name, (hf_name,), part_shape, _stored_type(part_name, part_shape, ggml_type, spec))
                )
            continue
        if expert_of(hf_name) is None:
            layout.append(_Tensor(name, (hf_name,), shape, _stored_type(name, shape, ggml_type, spec)))
            continue
        if name not in stacks:
            stacks[name], shapes[name] = [], shape
            layout.append(_Tensor(name, (), (), Q.F32))
        stacks[name].append(hf_name)
    return [
        _stacked(t.name, stacks[t.name], shapes[t.name], ggml_type, spec) if t.name in stacks else t for t in layout
    ]


def _kv_b_shapes(spec: Preset) -> tuple[tuple[int, ...], tuple[int, ...]]:
    c = spec.config
    heads, rank = c["num_attention_heads"], c["kv_lora_rank"]
    return (heads, rank, c["qk_nope_head_dim"]), (heads, c["v_head_dim"], rank)


def split_kv_b(kv_b: np.ndarray, spec: Preset) -> tuple[np.ndarray, np.ndarray]:
    """The current converter's split of DeepSeek-V2's `kv_b_proj` (`[heads * (nope + v), rank]`)
    for llama.cpp's absorbed latent attention: per head, the key rows transposed (`attn_k_b`,
    `[heads, rank, nope]`) and the value rows (`attn_v_b`, `[heads, v, rank]`)."""
    c = spec.config
    per_head = kv_b.reshape(c["num_attention_heads"], c["qk_nope_head_dim"] + c["v_head_dim"], -1)
    keys, values = per_head[:, : c["qk_nope_head_dim"]], per_head[:, c["qk_nope_head_dim"] :]
    return np.ascontiguousarray(keys.transpose(0, 2, 1)), np.ascontiguousarray(values)


def join_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """`kv_b_proj` back from `split_kv_b`'s two parts."""
    return np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, k_b.shape[1])


def _stacked(name: str, sources: list[str], shape: tuple[int, ...], ggml_type: str, spec: Preset) -> _Tensor:
    stacked = (len(sources), *shape)
    return _Tensor(name, tuple(sources), stacked, _stored_type(name, stacked, ggml_type, spec))


def llama3_rope_factors(spec: Preset) -> np.ndarray:
    """The converter's `rope_freqs`: per rotary frequency, the divisor Llama-3 scaling applies
    (1 for short wavelengths, `factor` for long ones, interpolated between)."""
    c, scaling = spec.config, spec.config["rope_scaling"]
    dim = _head_dim(spec)
    freqs = 1.0 / (c["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, between))
    return factors.astype(np.float32)


def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q or k projection from Hugging Face's rotate-half layout (per head, the first
    half of the rotary pairs, then the second) to GGUF's interleaved pairs, as the converter
    stores `llama` models."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _generated(name: str, spec: Preset) -> np.ndarray:
    """The values of a tensor the converter computes rather than copies."""
    if name == "rope_freqs.weight":
        return llama3_rope_factors(spec)
    scaling = spec.config["rope_scaling"]
    factors = scaling["long_factor"] if name == "rope_factors_long.weight" else scaling["short_factor"]
    return np.asarray(factors, dtype=np.float32)


def _converted(hf_name: str, values: np.ndarray, spec: Preset) -> np.ndarray:
    """A checkpoint tensor as the converter stores it: `llama`'s q/k rows interleaved, Gemma's
    norm weights plus one (its norms multiply by `1 + w`)."""
    c, arch = spec.config, architecture(spec)
    if arch == "llama" and ".q_proj." in hf_name:
        return permute_rotary(values, c["num_attention_heads"])
    if arch == "llama" and ".k_proj." in hf_name:
        return permute_rotary(values, c.get("num_key_value_heads", c["num_attention_heads"]))
    if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
        return values + np.float32(1.0)
    return values


def _values(tensor: _Tensor, spec: Preset, seed: int) -> np.ndarray:
    if not tensor.sources:
        return _generated(tensor.name, spec)
    if len(tensor.sources) > 1 or expert_of(tensor.sources[0]) is not None:
        return np.stack([random_tensor(name, tensor.shape[1:], seed) for name in tensor.sources])
    (source,) = tensor.sources
    if tensor.name.endswith((".attn_k_b.weight", ".attn_v_b.weight")):
        (heads, rank, nope), (_, v, _) = _kv_b_shapes(spec)
        k_b, v_b = split_kv_b(random_tensor(source, (heads * (nope + v), rank), seed), spec)
        return k_b if tensor.name.endswith(".attn_k_b.weight") else v_b
    # Gemma 3's converter drops the embedding rows past the tokenizer's.
    shape = (spec.config["vocab_size"], *tensor.shape[1:]) if tensor.name == "token_embd.weight" else tensor.shape
    return _converted(source, random_tensor(source, shape, seed), spec)[: tensor.shape[0]]


def _encode(values: np.ndarray, qtype: Q) -> np.ndarray:
    """The tensor's bytes as stored: gguf-py's quantizers where it has one, else candle's."""
    if qtype in _NUMPY_QUANTIZED:
        return gguf.quants.quantize(values, qtype)
    from exo import _core

    rows, cols = values.reshape(-1, values.shape[-1]).shape
    data = _core.quantize(np.ascontiguousarray(values, dtype="<f4").tobytes(), rows, cols, qtype.name)
    return np.frombuffer(data, dtype=np.uint8)


def _add_model_metadata(writer: gguf.GGUFWriter, preset: str, spec: Preset, ggml_type: str) -> None:
    """The hyperparameters, as each architecture's converter class writes them."""
    c, arch = spec.config, architecture(spec)
    heads = c["num_attention_heads"]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(preset)
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(heads)
    # DeepSeek-V2's latent attention is stored as one shared key/value head (MQA).
    writer.add_head_count_kv(1 if arch == "deepseek2" else c.get("num_key_value_heads", heads))
    # Gemma 2's converter writes no RoPE base (llama.cpp's default, 10 000, is Gemma 2's).
    if arch != "gemma2":
        writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    if "head_dim" in c:
        writer.add_key_length(c["head_dim"])
        writer.add_value_length(c["head_dim"])
    if _experts(spec):
        writer.add_expert_count(_experts(spec))
        writer.add_expert_used_count(c["num_experts_per_tok"])
    if "moe_intermediate_size" in c:
        writer.add_expert_feed_forward_length(c["moe_intermediate_size"])
    writer.add_file_type(GGUF_TYPES[ggml_type][1])
    if arch == "llama":
        writer.add_vocab_size(c["vocab_size"])
    if arch in ("llama", "qwen2", "qwen3", "phi3"):
        writer.add_rope_dimension_count(_rope_dims(spec))
    scaling = c.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    if scaling.get("rope_type", scaling.get("type")) == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
        writer.add_rope_scaling_yarn_beta_slow(scaling["beta_slow"])
    if arch == "phi3":
        _add_phi3_metadata(writer, spec)
    if arch.startswith("gemma"):
        _add_gemma_metadata(writer, spec)
    if arch == "deepseek2":
        _add_deepseek_metadata(writer, spec)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_phi3_metadata(writer: gguf.GGUFWriter, spec: Preset) -> None:
    """Phi-3's: the pre-training context, the window (0 for none: Phi-4) and LongRoPE's
    attention factor, which the converter derives from the context's growth."""
    c = spec.config
    original = c["original_max_position_embeddings"]
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_sliding_window(c.get("sliding_window") or 0)
    if _has_longrope(spec):
        scale = c["max_position_embeddings"] / original
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)


def _add_gemma_metadata(writer: gguf.GGUFWriter, spec: Preset) -> None:
    """Gemma's soft-caps and window (Gemma 3: its final cap only when it has one, and no
    attention cap, which Gemma 3 dropped). The query scale and Gemma 3's local RoPE base and
    layer pattern are not written: llama.cpp derives them."""
    c = spec.config
    if c["model_type"] == "gemma2":
        writer.add_attn_logit_softcapping(c["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(c["final_logit_softcapping"])
    elif c.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(c["final_logit_softcapping"])
    writer.add_sliding_window(c["sliding_window"])


def _add_deepseek_metadata(writer: gguf.GGUFWriter, spec: Preset) -> None:
    """DeepSeek-V2's: the latent attention's widths (`key_length`/`value_length` those of the
    latent, the `_mla` ones the heads'), the leading dense layers, the routing (groups, shared
    experts, scale) and YaRN's `mscale_all_dim` as a log multiplier."""
    c = spec.config
    rank, nope, rope, v = c["kv_lora_rank"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    writer.add_leading_dense_block_count(c["first_k_dense_replace"])
    writer.add_vocab_size(c["vocab_size"])
    if c["q_lora_rank"] is not None:
        writer.add_q_lora_rank(c["q_lora_rank"])
    writer.add_kv_lora_rank(rank)
    writer.add_key_length(rank + rope)
    writer.add_value_length(rank)
    writer.add_key_length_mla(nope + rope)
    writer.add_value_length_mla(v)
    writer.add_expert_shared_count(c["n_shared_experts"])
    writer.add_expert_group_count(c["n_group"])
    writer.add_expert_group_used_count(c["topk_group"])
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    writer.add_expert_weights_scale(c["routed_scaling_factor"])
    if c["norm_topk_prob"]:
        writer.add_expert_weights_norm(True)
    writer.add_rope_dimension_count(rope)
    writer.add_rope_scaling_yarn_log_mul(0.1 * c["rope_scaling"]["mscale_all_dim"])


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, spec: Preset, hf_dir: Path, n_tokens: int) -> None:
    """The preset's tokenizer (its Hugging Face files in `hf_dir`) as the converter stores a
    byte-level BPE (`gpt2`) vocabulary of `n_tokens`: ids past the trained vocabulary are
    `[PAD<id>]` placeholders; merges, special ids and the chat template come from gguf-py's
    `SpecialVocab` over the Hugging Face files."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    by_id = {i: token for token, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    special = {i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special}
    tokens, types = [], []
    for i in range(n_tokens):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(_USER_DEFINED if i not in by_id else _CONTROL if i in special else _NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe" if spec.family is LLAMA3 else "qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    vocab = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=n_tokens)
    vocab.add_to_gguf(writer, quiet=True)
    # Written by the converter only where tokenizer_config.json says it; llama.cpp's
    # default for a `gpt2` vocabulary would be to add none, so it is always written here.
    if "bos" not in vocab.add_special_token:
        writer.add_add_bos_token(spec.family.adds_bos)


# Layers of the Gemma 27B models, the ones whose queries llama.cpp scales by
# (hidden / heads)^-0.5 rather than head_dim^-0.5.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def llama_cpp_config(preset: str) -> dict[str, Any]:
    """The preset's `config.json` fields as llama.cpp reads them back from its GGUF file: the
    fields the converter drops take the values llama.cpp assumes (Gemma's query scale from the
    head width, Gemma 3's one global layer in six and local RoPE base of 10 000)."""
    c = dict(PRESETS[preset].config)
    if c["model_type"] in _GEMMA_27B_LAYERS:
        big = c["num_hidden_layers"] == _GEMMA_27B_LAYERS[c["model_type"]]
        c["query_pre_attn_scalar"] = c["hidden_size"] // c["num_attention_heads"] if big else _head_dim(PRESETS[preset])
    if c["model_type"] == "gemma3_text":
        c |= {"sliding_window_pattern": 6, "rope_local_base_freq": 10000.0}
        c.pop("layer_types", None)
    return c


def _batches(items: list[_Tensor], size: int) -> Iterator[list[_Tensor]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def write_gguf(preset: str, path: str | Path, ggml_type: str, seed: int = 0, split: int = 1) -> list[Path]:
    """Writes `preset`'s weights as a GGUF file of `ggml_type` (one of `GGUF_TYPES`) at `path`,
    or as `split` files `<stem>-0000i-of-0000N.gguf` beside it, split by tensor count as
    llama.cpp's gguf-split does; returns the files written."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    if ggml_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {ggml_type!r} (known: {', '.join(GGUF_TYPES)})")
    spec, path = PRESETS[preset], Path(path)
    with tempfile.TemporaryDirectory() as hf_dir:
        write_metadata(spec, Path(hf_dir), "f32")
        tokenizer_json = json.loads((Path(hf_dir) / "tokenizer.json").read_text())
        vocab = gemma3_vocab(tokenizer_json) if architecture(spec) == "gemma3" else None
        layout = tensor_layout(spec, ggml_type, vocab)
        per_file = math.ceil(len(layout) / max(split, 1))
        if split < 1 or math.ceil(len(layout) / per_file) != split:
            raise ValueError(f"cannot split {len(layout)} tensors into {split} files")
        writer = gguf.GGUFWriter(path, architecture(spec), split_max_tensors=per_file if split > 1 else 0)
        _add_model_metadata(writer, preset, spec, ggml_type)
        _add_tokenizer_metadata(writer, spec, Path(hf_dir), vocab or spec.config["vocab_size"])
    for tensor in layout:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.qtype)
    files = writer.format_shard_names(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # Tensors are drawn and quantized on every core, a few at a time (numpy and the extension
    # release the GIL), and written in order.
    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        for batch in _batches(layout, workers):
            for data in pool.map(lambda t: _encode(_values(t, spec, seed), t.qtype), batch):
                writer.write_tensor_data(data)
    writer.close()
    return files


def cached_gguf(preset: str, root: str | Path, ggml_type: str, seed: int = 0, split: int = 1) -> list[Path]:
    """The files of `write_gguf`, in `root/PRESET-TYPE[-seedS][-splitN]/`, written on first use
    (aside, then renamed, so an interrupted run leaves nothing half-written)."""
    name = f"{preset}-{ggml_type}" + (f"-seed{seed}" if seed else "") + (f"-split{split}" if split > 1 else "")
    model_dir = Path(root) / name
    if not model_dir.exists():
        partial = model_dir.with_name(model_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_gguf(preset, partial / f"{preset}-{ggml_type}.gguf", ggml_type, seed=seed, split=split)
        partial.rename(model_dir)
    return sorted(model_dir.glob("*.gguf"))
