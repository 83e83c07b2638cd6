"""MLX-quantized synthetic checkpoints: laid out as described, byte for byte what `mlx_lm.convert`
writes from the plain checkpoint, loaded by `mlx_lm.load`, and their f32 reference exact."""

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from exo.testing.synth import PRESETS, tensor_plan, write_model  # noqa: E402
from exo.testing.synth_mlx import cached_mlx_model, write_mlx_model, write_mlx_reference  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog"


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        return json.loads(file.read(length))


def _tensors(directory: Path) -> dict[str, Any]:
    """Every tensor of the checkpoint, over all its files."""
    tensors: dict[str, Any] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors |= mx.load(str(file))
    return tensors


def _f32(array: Any) -> np.ndarray:
    return np.asarray(array.astype(mx.float32))


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize(
    ("preset", "bits", "group_size", "dtype"),
    [("tiny-qwen2", 4, 64, "bf16"), ("tiny-qwen3", 8, 128, "f16"), ("tiny-llama-untied", 3, 32, "f32")],
)
def test_layout_and_config(tmp_path: Path, preset: str, bits: int, group_size: int, dtype: str) -> None:
    out = write_mlx_model(preset, tmp_path / "mlx", bits, group_size, dtype)
    plain = write_model(preset, tmp_path / "plain", dtype)
    header = _header(out / "model.safetensors")
    assert header.pop("__metadata__") == {"format": "mlx"}
    stored = {"f32": "F32", "bf16": "BF16", "f16": "F16"}[dtype]
    expected: dict[str, tuple[str, list[int]]] = {}
    for name, shape in tensor_plan(PRESETS[preset]):
        if len(shape) == 2 and shape[1] % group_size == 0:
            rows, cols = shape
            stem = name.removesuffix(".weight")
            expected[name] = ("U32", [rows, cols * bits // 32])
            expected[f"{stem}.scales"] = expected[f"{stem}.biases"] = (stored, [rows, cols // group_size])
        else:
            expected[name] = (stored, list(shape))
    assert {name: (entry["dtype"], entry["shape"]) for name, entry in header.items()} == expected
    # Rows of 64 values do not split into groups of 128: those matrices stay as they were.
    assert ("model.layers.0.self_attn.q_proj.scales" in header) == (group_size != 128)
    assert "model.layers.0.mlp.down_proj.scales" in header

    config = json.loads((out / "config.json").read_text())
    settings = {"group_size": group_size, "bits": bits, "mode": "affine"}
    assert config.pop("quantization") == config.pop("quantization_config") == settings
    assert config == json.loads((plain / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (plain / name).read_bytes()


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_packed_bits_scales_and_biases_give_the_reference_weights(tmp_path: Path, bits: int, dtype: str) -> None:
    """Values are a little-endian bit stream (3 and 6 bits cross words); a weight is
    `scales * q + biases` of its group in f32, exactly the reference's, within a step of the
    plain checkpoint's (mlx stores the group's larger-magnitude end exactly and rounds toward it;
    bf16 scales and biases add their own rounding)."""
    group = 32
    quantized = _tensors(write_mlx_model("tiny-qwen3", tmp_path / "q", bits, group, dtype))
    reference = _tensors(write_mlx_reference("tiny-qwen3", tmp_path / "r", bits, group, dtype))
    plain = _tensors(write_model("tiny-qwen3", tmp_path / "p", dtype))
    for stem in ("model.embed_tokens", "model.layers.1.self_attn.k_proj", "model.layers.3.mlp.down_proj", "lm_head"):
        words = np.asarray(quantized[f"{stem}.weight"]).astype("<u4")
        rows = words.shape[0]
        stream = np.unpackbits(words.view(np.uint8).reshape(rows, -1), axis=1, bitorder="little")
        values = (stream.reshape(rows, -1, bits) @ (1 << np.arange(bits))).astype(np.float32)
        scales = np.repeat(_f32(quantized[f"{stem}.scales"]), group, axis=1)
        biases = np.repeat(_f32(quantized[f"{stem}.biases"]), group, axis=1)
        weights = _f32(reference[f"{stem}.weight"])
        assert values.max() == 2**bits - 1
        np.testing.assert_array_equal(scales * values + biases, weights)
        error = np.abs(weights - _f32(plain[f"{stem}.weight"]))
        rounding = 2.0**-7 * (np.abs(biases) + np.abs(scales) * (2**bits - 1)) if dtype == "bf16" else 1e-7
        assert 0 < error.max() and (error <= np.abs(scales) + rounding).all()
    for name in ("model.norm.weight", "model.layers.2.self_attn.q_norm.weight"):
        np.testing.assert_array_equal(_f32(reference[name]), _f32(plain[name]))


def test_same_inputs_same_bytes_and_shards(tmp_path: Path) -> None:
    a = _digest(write_mlx_model("tiny-llama", tmp_path / "a", 4, 64, "bf16", seed=5))
    b = _digest(cached_mlx_model("tiny-llama", tmp_path / "cache", 4, 64, "bf16", seed=5))
    c = _digest(write_mlx_model("tiny-llama", tmp_path / "c", 4, 64, "bf16", seed=6))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"] and a["tokenizer.json"] == c["tokenizer.json"]
    assert (tmp_path / "cache" / "tiny-llama-bf16-mlx4-g64").is_dir()

    sharded = write_mlx_model("tiny-llama", tmp_path / "s", 4, 64, "bf16", seed=5, num_shards=2)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    whole, parts = _tensors(tmp_path / "a"), _tensors(sharded)
    assert set(index["weight_map"]) == set(whole) == set(parts)
    assert index["weight_map"]["model.layers.3.mlp.up_proj.scales"] == "model-00002-of-00002.safetensors"
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in whole.values())
    assert all(mx.array_equal(whole[name], parts[name]).item() for name in whole)


def test_cli_writes_the_same_directory(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "exo.testing.synth", "--preset", "tiny-qwen2", "--mlx-quantize", "8"]
    subprocess.run([*command, "--dtype", "bf16", "--out", str(tmp_path / "cli")], check=True)
    assert _digest(tmp_path / "cli") == _digest(write_mlx_model("tiny-qwen2", tmp_path / "py", 8, 64, "bf16"))
    subprocess.run([*command, "--group-size", "32", "--mlx-reference", "--out", str(tmp_path / "ref")], check=True)
    assert _digest(tmp_path / "ref") == _digest(write_mlx_reference("tiny-qwen2", tmp_path / "pyref", 8, 32))
    for wrong in (
        ["--mlx-quantize", "7"],
        ["--mlx-quantize", "4", "--group-size", "48"],
        ["--mlx-quantize", "4", "--gguf", "q8_0"],
    ):
        done = subprocess.run(
            [*command[:5], *wrong, "--out", str(tmp_path / "x")], capture_output=True, text=True, check=False
        )
        assert done.returncode == 2, done.stderr


@pytest.mark.parametrize(
    ("preset", "bits", "group_size", "dtype"),
    [("tiny-llama-untied", 4, 64, "bf16"), ("tiny-qwen2", 8, 64, "f32"), ("tiny-qwen3", 3, 128, "f16")],
)
def test_mlx_lm_convert_writes_the_same_tensors(
    tmp_path: Path, preset: str, bits: int, group_size: int, dtype: str
) -> None:
    convert = pytest.importorskip("mlx_lm").convert
    plain = write_model(preset, tmp_path / "plain", dtype)
    convert(str(plain), str(tmp_path / "converted"), quantize=True, q_bits=bits, q_group_size=group_size)
    theirs = _tensors(tmp_path / "converted")
    ours = _tensors(write_mlx_model(preset, tmp_path / "ours", bits, group_size, dtype))
    assert set(ours) == set(theirs)
    for name, array in ours.items():
        assert (array.dtype, array.shape) == (theirs[name].dtype, theirs[name].shape), name
        assert mx.array_equal(array, theirs[name]).item(), name
    converted = json.loads((tmp_path / "converted" / "config.json").read_text())
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    for key in ("quantization", "quantization_config", "tie_word_embeddings"):
        assert config[key] == converted[key]


@pytest.mark.parametrize(("preset", "bits"), [("tiny-llama-untied", 4), ("tiny-qwen2", 8), ("tiny-qwen3", 2)])
def test_mlx_lm_runs_it_as_its_f32_reference(tmp_path: Path, preset: str, bits: int) -> None:
    """mlx-lm's quantized layers on our checkpoint give the logits of its plain layers on the
    dequantized weights (within 1e-5; both are f32 here), so every tensor is where mlx-lm looks."""
    mlx_lm = pytest.importorskip("mlx_lm")
    nn = pytest.importorskip("mlx.nn")
    model, tokenizer = mlx_lm.load(str(write_mlx_model(preset, tmp_path / "q", bits)))
    reference, _ = mlx_lm.load(str(write_mlx_reference(preset, tmp_path / "r", bits)))
    kinds = {type(module) for _, module in model.named_modules()}
    assert {nn.QuantizedLinear, nn.QuantizedEmbedding} <= kinds and nn.Linear not in kinds
    ids = tokenizer.encode(PROMPT)
    for _ in range(8):
        logits, expected = model(mx.array([ids]))[0], reference(mx.array([ids]))[0]
        np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=0, atol=1e-5)
        ids.append(int(mx.argmax(expected[-1]).item()))
        assert int(mx.argmax(logits[-1]).item()) == ids[-1]
    plain, _ = mlx_lm.load(str(write_model(preset, tmp_path / "p")))
    assert np.abs(np.asarray(plain(mx.array([ids]))) - np.asarray(reference(mx.array([ids])))).max() > 1e-4
