"""The f32 safetensors twin of a GGUF file: its weights dequantized and put back as Hugging Face
stores them, the reference its quantized runs are held to."""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
from gguf import GGUFReader
from safetensors.numpy import load_file, save_file

from exo.testing.synth import PRESETS, cached_model
from exo.testing.synth_gguf import architecture, expert_of, gguf_name, join_kv_b, llama_cpp_config, permute_rotary


def with_config(preset_dir: Path, config: dict[str, object], out: Path) -> Path:
    """A copy of `preset_dir` whose `config.json` has `config`'s fields."""
    shutil.copytree(preset_dir, out)
    written = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(written | config))
    return out


def dequantized_checkpoint(gguf_file: Path, preset: str, root: Path, out: Path) -> Path:
    """A safetensors copy of the preset whose weights are `gguf_file`'s, dequantized to f32 and
    put back as Hugging Face stores them (llama's q/k rows in their order, Gemma's norms less the
    converter's 1, experts unstacked), with the config llama.cpp reads."""
    reader = GGUFReader(gguf_file)
    stored = {t.name: t for t in reader.tensors}
    preset_dir = cached_model(preset, root / "safetensors", "f32")
    arch, c = architecture(PRESETS[preset]), PRESETS[preset].config
    tensors = {}

    def decoded(name: str) -> np.ndarray:
        tensor = stored[name]
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)

    for name, original in load_file(preset_dir / "model.safetensors").items():
        if arch == "deepseek2" and name.endswith(".kv_b_proj.weight"):
            # The converter splits it per head into its key (transposed) and value rows.
            stem = gguf_name(name, arch).removesuffix(".attn_kv_b.weight")
            tensors[name] = join_kv_b(decoded(f"{stem}.attn_k_b.weight"), decoded(f"{stem}.attn_v_b.weight"))
            continue
        values = decoded(gguf_name(name, arch))
        expert = expert_of(name)
        # Gemma 3's embedding keeps the rows of its tokenizer only.
        values = (values if expert is None else values[expert]).reshape(-1, *original.shape[1:])
        if arch == "llama" and ".q_proj." in name:
            values = _unpermute(values, c["num_attention_heads"])
        if arch == "llama" and ".k_proj." in name:
            values = _unpermute(values, c["num_key_value_heads"])
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            values = values - np.float32(1.0)
        tensors[name] = values
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    with_config(preset_dir, llama_cpp_config(preset) | {"vocab_size": vocab}, out)
    save_file(tensors, out / "model.safetensors")
    return out


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    restored = weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2)
    restored = restored.reshape(weight.shape)
    assert np.array_equal(permute_rotary(restored, heads), weight)
    return restored
