"""GGUF files of the synthetic presets, written as llama.cpp's `convert_hf_to_gguf.py` (and, for
the K-quant mixes, `llama-quantize`) would write the same Hugging Face model.

The weights are the safetensors preset's own seeded f32 values; the tokenizer is its byte-level
BPE, stored as `tokenizer.ggml.*` metadata. The same preset, type and seed give the same bytes.
Needs the `gguf` package (its writer and its numpy quantizers) and, for the K-quants, which
gguf-py cannot quantize, the built `exo._core` (candle's quantizers).
"""

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

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

_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# Hugging Face name parts → GGUF name parts (gguf-py's tensor map for these architectures).
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

# llama.cpp's token types.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the file: its GGUF name, where its values come from, shape and type."""

    name: str
    source: str | None  # the safetensors name; None for the generated `rope_freqs`
    shape: tuple[int, ...]
    qtype: Q

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def gguf_name(hf_name: str) -> str:
    """The GGUF name of a Hugging Face tensor name (`model.layers.3.mlp.up_proj.weight` →
    `blk.3.ffn_up.weight`)."""
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    _, _, layer, part = stem.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[part]}.{suffix}"


def _use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get more bits in Q4_K_M:
    the first and last eighth, and every third layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _q4_k_m_type(name: str, layers: int, tied: bool) -> Q:
    """llama-quantize's type for a matrix of a Q4_K_M file (before the row-size fallback)."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return Q.Q6_K
    if name.endswith((".attn_v.weight", ".ffn_down.weight")) and _use_more_bits(int(name.split(".")[1]), layers):
        return Q.Q6_K
    return Q.Q4_K


def _matrix_type(name: str, cols: int, ggml_type: str, spec: Preset) -> Q:
    wanted = GGUF_TYPES[ggml_type][0]
    if ggml_type == "q4_k_m":
        wanted = _q4_k_m_type(name, spec.config["num_hidden_layers"], spec.tied)
        # llama-quantize gives `output` Q8_0 outright when its rows do not fill K blocks.
        if wanted == Q.Q6_K and name in ("output.weight", "token_embd.weight") and cols % gguf.QK_K:
            return Q.Q8_0
    if cols % gguf.GGML_QUANT_SIZES[wanted][0] == 0:
        return wanted
    fallback = _ROW_FALLBACK.get(wanted, Q.F16)
    # Both tools end at F16 when even the fallback's blocks do not fit (the converter goes
    # straight there for Q8_0).
    return fallback if cols % gguf.GGML_QUANT_SIZES[fallback][0] == 0 else Q.F16


def _has_llama3_rope(spec: Preset) -> bool:
    scaling = spec.config.get("rope_scaling") or {}
    return scaling.get("rope_type") == "llama3"


def _head_dim(spec: Preset) -> int:
    c = spec.config
    return c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])


def tensor_layout(spec: Preset, ggml_type: str) -> list[_Tensor]:
    """Every tensor of the GGUF file, in file order: `rope_freqs` first when the model has
    Llama-3 rope scaling (the converter's extra tensors come first), then the checkpoint's."""
    layout = []
    if _has_llama3_rope(spec):
        layout.append(_Tensor("rope_freqs.weight", None, (_head_dim(spec) // 2,), Q.F32))
    for hf_name, shape in tensor_plan(spec):
        name = gguf_name(hf_name)
        qtype = Q.F32 if len(shape) == 1 else _matrix_type(name, shape[-1], ggml_type, spec)
        layout.append(_Tensor(name, hf_name, shape, qtype))
    return layout


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


def _values(tensor: _Tensor, spec: Preset, seed: int) -> np.ndarray:
    if tensor.source is None:
        return llama3_rope_factors(spec)
    values = random_tensor(tensor.source, tensor.shape, seed)
    c = spec.config
    if _ARCHITECTURES[c["model_type"]] == "llama":
        if ".attn_q." in tensor.name:
            return permute_rotary(values, c["num_attention_heads"])
        if ".attn_k." in tensor.name:
            return permute_rotary(values, c.get("num_key_value_heads", c["num_attention_heads"]))
    return values


def _encode(values: np.ndarray, qtype: Q) -> np.ndarray:
    """The tensor's bytes as stored: gguf-py's quantizers where it has one, else candle's."""
    if qtype in _NUMPY_QUANTIZED:
        return gguf.quants.quantize(values, qtype)
    from exo import _core

    rows, cols = values.reshape(-1, values.shape[-1]).shape
    data = _core.quantize(np.ascontiguousarray(values, dtype="<f4").tobytes(), rows, cols, qtype.name)
    return np.frombuffer(data, dtype=np.uint8)


def _add_model_metadata(writer: gguf.GGUFWriter, preset: str, spec: Preset, ggml_type: str) -> None:
    c = spec.config
    heads = c["num_attention_heads"]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(preset)
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(c.get("num_key_value_heads", heads))
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    if "head_dim" in c:
        writer.add_key_length(c["head_dim"])
        writer.add_value_length(c["head_dim"])
    writer.add_file_type(GGUF_TYPES[ggml_type][1])
    writer.add_vocab_size(c["vocab_size"])
    writer.add_rope_dimension_count(_head_dim(spec))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, spec: Preset) -> None:
    """The preset's tokenizer as the converter stores a byte-level BPE (`gpt2`) vocabulary:
    ids past the trained vocabulary are `[PAD<id>]` placeholders; merges, special ids and the
    chat template come from gguf-py's `SpecialVocab` over the Hugging Face files."""
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as hf_dir:
        write_metadata(spec, Path(hf_dir), "f32")
        tokenizer = Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))
        by_id = {i: token for token, i in tokenizer.get_vocab(with_added_tokens=True).items()}
        special = {i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special}
        tokens, types = [], []
        for i in range(spec.config["vocab_size"]):
            tokens.append(by_id.get(i, f"[PAD{i}]"))
            types.append(_USER_DEFINED if i not in by_id else _CONTROL if i in special else _NORMAL)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe" if spec.family is LLAMA3 else "qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        vocab = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=spec.config["vocab_size"])
        vocab.add_to_gguf(writer, quiet=True)
        # Written by the converter only where tokenizer_config.json says it; llama.cpp's
        # default for a `gpt2` vocabulary would be to add none, so it is always written here.
        if "bos" not in vocab.add_special_token:
            writer.add_add_bos_token(spec.family.adds_bos)


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
    layout = tensor_layout(spec, ggml_type)
    per_file = math.ceil(len(layout) / max(split, 1))
    if split < 1 or math.ceil(len(layout) / per_file) != split:
        raise ValueError(f"cannot split {len(layout)} tensors into {split} files")
    architecture = _ARCHITECTURES[spec.config["model_type"]]
    writer = gguf.GGUFWriter(path, architecture, split_max_tensors=per_file if split > 1 else 0)
    _add_model_metadata(writer, preset, spec, ggml_type)
    _add_tokenizer_metadata(writer, spec)
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
