"""GGUF fidelity: candle's dequantization is bit-exact against gguf-py's numpy reference for every
type, and the synthetic GGUF writer stores the preset's own weights as llama.cpp's tools would."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from exo import _core
from exo.testing.synth import LLAMA3, PRESETS, QWEN3, write_model
from exo.testing.synth_gguf import cached_gguf, gguf_name, join_kv_b, llama3_rope_factors, write_gguf

# Byte offsets of the f16 scales in each type's block (the rest of a block is free bits; Q8_K's
# scale is an f32 at 0).
F16_FIELDS = {
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q8_0: (0,),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}
NUMPY_QUANTIZED = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
ROWS, COLS = 8, 512


def _values(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((ROWS, COLS), dtype=np.float32) * np.float32(0.05)).astype(np.float32)


def _ours(data: bytes, qtype: Q) -> np.ndarray:
    return np.frombuffer(_core.dequantize(data, ROWS, COLS, qtype.name), dtype="<f4").reshape(ROWS, COLS)


def _assert_bit_exact(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    np.testing.assert_array_equal(ours.view(np.uint32), reference.astype(np.float32).view(np.uint32))


def _random_blocks(qtype: Q, seed: int = 1) -> bytes:
    """Random bytes for every bit of `ROWS` rows of blocks, with finite f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (ROWS * COLS // block, size), dtype=np.uint8)
    for offset in F16_FIELDS.get(qtype, ()):
        scales = (rng.standard_normal(len(blocks)) * 0.01).astype("<f2")
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    if qtype == Q.Q8_K:
        blocks[:, :4] = (rng.standard_normal(len(blocks)) * 0.01).astype("<f4").view(np.uint8).reshape(-1, 4)
    return blocks.tobytes()


def _reference(data: bytes, qtype: Q) -> np.ndarray:
    """gguf-py's dequantization; for Q8_K, which it lacks, the block's plain meaning (an f32
    scale times 256 signed bytes, then 16 sums the dot products use) in numpy."""
    raw = np.frombuffer(data, dtype=np.uint8).reshape(ROWS, -1)
    if qtype != Q.Q8_K:
        return gguf.quants.dequantize(raw, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.frombuffer(data, dtype=np.uint8).reshape(-1, size)
    scale, qs = blocks[:, :4].copy().view("<f4"), blocks[:, 4 : 4 + block].view(np.int8)
    return (qs.astype(np.float32) * scale).reshape(ROWS, COLS)


@pytest.mark.parametrize("qtype", NUMPY_QUANTIZED, ids=lambda q: q.name)
def test_dequantize_matches_gguf_py_on_its_own_quantization(qtype: Q) -> None:
    data = gguf.quants.quantize(_values(), qtype).tobytes()
    _assert_bit_exact(_ours(data, qtype), _reference(data, qtype))


@pytest.mark.parametrize("qtype", [*K_QUANTS, Q.Q8_K], ids=lambda q: q.name)
def test_dequantize_matches_the_reference_on_candles_quantization(qtype: Q) -> None:
    data = _core.quantize(_values().tobytes(), ROWS, COLS, qtype.name)
    assert len(data) == ROWS * COLS // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1]
    ours = _ours(data, qtype)
    _assert_bit_exact(ours, _reference(data, qtype))
    # A round trip lands near the values (Q2_K, the coarsest, within a third of their spread).
    assert np.abs(ours - _values()).max() < 0.05 * (1.5 if qtype == Q.Q2_K else 1.0)


@pytest.mark.parametrize("qtype", [*NUMPY_QUANTIZED[2:], *K_QUANTS, Q.Q8_K], ids=lambda q: q.name)
def test_dequantize_matches_the_reference_on_random_blocks(qtype: Q) -> None:
    data = _random_blocks(qtype)
    _assert_bit_exact(_ours(data, qtype), _reference(data, qtype))


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16], ids=lambda q: q.name)
def test_half_floats_match_gguf_py_on_random_values(qtype: Q) -> None:
    values = (np.random.default_rng(2).standard_normal((ROWS, COLS)) * 100).astype(np.float32)
    data = gguf.quants.quantize(values, qtype).tobytes()
    _assert_bit_exact(_ours(data, qtype), _reference(data, qtype))
    assert _core.quantize(values.tobytes(), ROWS, COLS, qtype.name.lower()) == data


def test_bad_arguments_raise_value_errors_naming_the_problem() -> None:
    with pytest.raises(ValueError, match='unknown GGML type "Q4_K_M"'):
        _core.dequantize(b"", 0, 256, "Q4_K_M")
    with pytest.raises(ValueError, match=r"100 columns .* Q4_K's block of 256"):
        _core.quantize(bytes(400), 1, 100, "q4_k")
    with pytest.raises(ValueError, match=r"143 bytes .* takes 144"):
        _core.dequantize(bytes(143), 1, 256, "Q4_K")
    with pytest.raises(ValueError, match="255 values for a 1 x 256 matrix"):
        _core.quantize(bytes(1020), 1, 256, "Q8_0")


# --- The synthetic GGUF writer ---------------------------------------------------------------


def _fields(reader: gguf.GGUFReader) -> dict[str, object]:
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(paths: list[Path]) -> dict[str, gguf.ReaderTensor]:
    tensors: dict[str, gguf.ReaderTensor] = {}
    for path in paths:
        for tensor in gguf.GGUFReader(path).tensors:
            assert tensor.name not in tensors, tensor.name
            tensors[tensor.name] = tensor
    return tensors


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__")
    data = raw[8 + length :]
    return {
        name: np.frombuffer(data[start:end], dtype="<f4").reshape(info["shape"])
        for name, info in header.items()
        for start, end in [info["data_offsets"]]
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


def test_tiny_llama_q4_k_m_metadata_and_fallback_types(root: Path) -> None:
    [path] = cached_gguf("tiny-llama", root, "q4_k_m")
    reader = gguf.GGUFReader(path)
    fields = _fields(reader)
    c = PRESETS["tiny-llama"].config
    assert fields["general.architecture"] == "llama"
    assert fields["general.name"] == "tiny-llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    expected = {
        "llama.block_count": 4,
        "llama.context_length": 2048,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 500000.0,
        "llama.vocab_size": 512,
        "llama.rope.dimension_count": 16,
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c["rms_norm_eps"])
    assert "llama.attention.key_length" not in fields
    tensors = _tensors([path])
    assert "output.weight" not in tensors
    assert tensors["rope_freqs.weight"].tensor_type == Q.F32
    np.testing.assert_array_equal(tensors["rope_freqs.weight"].data, llama3_rope_factors(PRESETS["tiny-llama"]))
    assert tensors["token_embd.weight"].shape.tolist() == [64, 512]
    assert tensors["blk.0.attn_k.weight"].shape.tolist() == [64, 32]
    # Rows of 64 and 128 values fill no 256-value K block: llama.cpp's fallbacks.
    assert tensors["token_embd.weight"].tensor_type == Q.Q8_0
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q5_0
    assert tensors["blk.3.ffn_down.weight"].tensor_type == Q.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32


def test_q4_k_m_mix_follows_llama_quantize(root: Path) -> None:
    tensors = _tensors(cached_gguf("tiny-llama-k", root, "q4_k_m"))
    types = {name: Q(t.tensor_type).name for name, t in tensors.items()}
    # Tied embeddings take the output's Q6_K; with 4 layers, use_more_bits picks layers 2 and 3.
    assert types["token_embd.weight"] == "Q6_K"
    for layer in range(4):
        more = "Q6_K" if layer >= 2 else "Q4_K"
        assert types[f"blk.{layer}.attn_v.weight"] == more
        assert types[f"blk.{layer}.ffn_down.weight"] == more
        for part in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{layer}.{part}.weight"] == "Q4_K"


def test_tokenizer_metadata(root: Path) -> None:
    fields = _fields(gguf.GGUFReader(cached_gguf("tiny-llama", root, "q8_0")[0]))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert isinstance(tokens, list) and isinstance(types, list)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(tokens) == len(types) == 512
    bos, eot = tokens.index("<|begin_of_text|>"), tokens.index("<|eot_id|>")
    assert fields["tokenizer.ggml.bos_token_id"] == bos
    # The converter takes EOS from tokenizer_config.json, whose eos_token is the end of turn.
    assert fields["tokenizer.ggml.eos_token_id"] == eot
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert types[bos] == types[eot] == 3
    assert tokens[511] == "[PAD511]" and types[511] == 4
    assert types[tokens.index("Ġthe")] == 1
    assert fields["tokenizer.chat_template"] == LLAMA3.chat_template
    merges = fields["tokenizer.ggml.merges"]
    assert isinstance(merges, list) and merges and all(len(m.split(" ")) == 2 for m in merges)


def test_qwen3_names_norms_and_head_dim(root: Path) -> None:
    [path] = cached_gguf("tiny-qwen3", root, "bf16")
    fields = _fields(gguf.GGUFReader(path))
    assert fields["general.architecture"] == "qwen3"
    assert fields["qwen3.attention.key_length"] == fields["qwen3.attention.value_length"] == 32
    assert fields["tokenizer.ggml.pre"] == "qwen2"
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == QWEN3.chat_template
    tensors = _tensors([path])
    assert tensors["blk.1.attn_q_norm.weight"].tensor_type == Q.F32
    assert tensors["blk.1.attn_q.weight"].tensor_type == Q.BF16
    assert tensors["output.weight"].tensor_type == Q.BF16
    assert "rope_freqs.weight" not in tensors


def test_split_files_hold_every_tensor_once_with_the_same_bytes(root: Path) -> None:
    single = _tensors(cached_gguf("tiny-qwen2", root, "q8_0"))
    paths = cached_gguf("tiny-qwen2", root, "q8_0", split=3)
    assert [p.name for p in paths] == [f"tiny-qwen2-q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for index, path in enumerate(paths):
        fields = _fields(gguf.GGUFReader(path))
        assert (fields["split.no"], fields["split.count"], fields["split.tensors.count"]) == (index, 3, len(single))
    split = _tensors(paths)
    assert split.keys() == single.keys()
    assert "blk.0.attn_q.bias" in split
    for name, tensor in single.items():
        assert bytes(split[name].data) == bytes(tensor.data), name


def test_llama_q_and_k_rows_are_permuted_as_the_converter_does(tmp_path: Path) -> None:
    hf = _safetensors(write_model("tiny-llama-untied", tmp_path / "hf") / "model.safetensors")
    tensors = _tensors(write_gguf("tiny-llama-untied", tmp_path / "m.gguf", "f32"))
    c = PRESETS["tiny-llama-untied"].config
    for hf_name, heads in (
        ("model.layers.1.self_attn.q_proj.weight", c["num_attention_heads"]),
        ("model.layers.1.self_attn.k_proj.weight", c["num_key_value_heads"]),
    ):
        stored = np.asarray(tensors[gguf_name(hf_name)].data)
        rows, cols = stored.shape
        # Undo the interleaving: per head, the even rows then the odd rows.
        restored = stored.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        np.testing.assert_array_equal(restored, hf[hf_name])
        assert not np.array_equal(stored, hf[hf_name])
    v = "model.layers.1.self_attn.v_proj.weight"
    np.testing.assert_array_equal(np.asarray(tensors[gguf_name(v)].data), hf[v])
    np.testing.assert_array_equal(np.asarray(tensors["output.weight"].data), hf["lm_head.weight"])


def test_same_inputs_same_bytes_and_the_cli_writes_splits(tmp_path: Path) -> None:
    a = write_gguf("tiny-llama-k", tmp_path / "a.gguf", "q4_k_m", seed=5)
    b = write_gguf("tiny-llama-k", tmp_path / "b.gguf", "q4_k_m", seed=5)
    assert a[0].read_bytes() == b[0].read_bytes()
    out = tmp_path / "cli" / "m.gguf"
    command = [sys.executable, "-m", "exo.testing.synth", "--preset", "tiny-llama", "--out", str(out)]
    subprocess.run([*command, "--gguf", "Q4_0", "--split", "2"], check=True, capture_output=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    bad = subprocess.run([*command, "--gguf", "q9_9"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown GGUF type 'q9_9'" in bad.stderr


def test_gemma_files_hold_norms_plus_one_and_gemma3_cuts_its_vocabulary(tmp_path: Path) -> None:
    for preset, arch in (("tiny-gemma2", "gemma2"), ("tiny-gemma3", "gemma3")):
        hf = _safetensors(write_model(preset, tmp_path / preset) / "model.safetensors")
        (path,) = write_gguf(preset, tmp_path / f"{preset}.gguf", "f32")
        tensors, fields = _tensors([path]), _fields(gguf.GGUFReader(path))
        c = PRESETS[preset].config
        assert fields["general.architecture"] == arch and "output.weight" not in tensors
        for hf_name in ("model.layers.1.post_attention_layernorm.weight", "model.norm.weight"):
            stored = np.asarray(tensors[gguf_name(hf_name, arch)].data)
            np.testing.assert_array_equal(stored, hf[hf_name] + np.float32(1.0))
        # The MLP's input norm is `ffn_norm`, its output norm `post_ffw_norm`.
        pre = np.asarray(tensors["blk.0.ffn_norm.weight"].data)
        np.testing.assert_array_equal(pre, hf["model.layers.0.pre_feedforward_layernorm.weight"] + np.float32(1.0))
        assert "blk.0.post_ffw_norm.weight" in tensors and f"{arch}.attention.sliding_window" in fields
        # The converter writes no query scale: llama.cpp derives it from the head width.
        assert not any("query_pre_attn" in name or "scale" in name for name in fields if name.startswith(arch))
        embedding = np.asarray(tensors["token_embd.weight"].data)
        rows = embedding.shape[0]
        tokens = fields["tokenizer.ggml.tokens"]
        assert isinstance(tokens, list) and len(tokens) == rows
        np.testing.assert_array_equal(embedding, hf["model.embed_tokens.weight"][:rows])
        if arch == "gemma2":
            assert rows == c["vocab_size"] and fields["gemma2.attn_logit_softcapping"] == pytest.approx(0.3)
            assert "gemma2.rope.freq_base" not in fields
        else:
            # The tokenizer's vocabulary and added tokens (counted twice, as the converter does).
            tokenizer = json.loads((tmp_path / preset / "tokenizer.json").read_text())
            assert rows == len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"]) < c["vocab_size"]
            assert fields["gemma3.rope.scaling.type"] == "linear" and fields["gemma3.rope.scaling.factor"] == 8.0
            assert "gemma3.attn_logit_softcapping" not in fields


def test_phi3_files_hold_fused_projections_and_longrope_factors(tmp_path: Path) -> None:
    hf = _safetensors(write_model("tiny-phi3-partial", tmp_path / "hf") / "model.safetensors")
    (path,) = write_gguf("tiny-phi3-partial", tmp_path / "phi3.gguf", "f32")
    tensors, fields = _tensors([path]), _fields(gguf.GGUFReader(path))
    c = PRESETS["tiny-phi3-partial"].config
    scaling = c["rope_scaling"]
    np.testing.assert_array_equal(tensors["rope_factors_long.weight"].data, np.float32(scaling["long_factor"]))
    np.testing.assert_array_equal(tensors["rope_factors_short.weight"].data, np.float32(scaling["short_factor"]))
    # Phi-3 is not permuted: the fused rows are Hugging Face's.
    for hf_name, name in (("self_attn.qkv_proj", "attn_qkv"), ("mlp.gate_up_proj", "ffn_up")):
        np.testing.assert_array_equal(
            np.asarray(tensors[f"blk.1.{name}.weight"].data), hf[f"model.layers.1.{hf_name}.weight"]
        )
    assert fields["phi3.rope.dimension_count"] == 12  # 0.75 of 16
    assert fields["phi3.attention.sliding_window"] == 0  # none: Phi-4's kind
    assert fields["phi3.rope.scaling.original_context_length"] == 40
    growth = c["max_position_embeddings"] / 40
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(growth) / np.log(40)))
    assert "phi3.attention.key_length" not in fields


def test_experts_are_stacked_with_the_expert_outermost(tmp_path: Path) -> None:
    for preset, arch, names in (
        ("tiny-qwen3-moe", "qwen3moe", ("mlp", "gate_proj", "up_proj", "down_proj")),
        ("tiny-mixtral", "llama", ("block_sparse_moe", "w1", "w3", "w2")),
    ):
        hf = _safetensors(write_model(preset, tmp_path / preset) / "model.safetensors")
        (path,) = write_gguf(preset, tmp_path / f"{preset}.gguf", "q8_0")
        tensors, fields = _tensors([path]), _fields(gguf.GGUFReader(path))
        c = PRESETS[preset].config
        experts = c.get("num_experts") or c["num_local_experts"]
        assert (fields[f"{arch}.expert_count"], fields[f"{arch}.expert_used_count"]) == (experts, 2)
        block, *projections = names
        if arch == "qwen3moe":
            # Its dense layer (`mlp_only_layers`) keeps a plain MLP and has no router.
            assert "blk.2.ffn_gate_inp.weight" not in tensors and "blk.2.ffn_gate.weight" in tensors
        # The router stays F32; each stack is [experts, rows, cols] (GGUF lists it innermost first).
        assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == Q.F32
        for projection, part in zip(projections, ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"), strict=True):
            stacked = tensors[f"blk.0.{part}.weight"]
            rows, cols = hf[f"model.layers.0.{block}.experts.0.{projection}.weight"].shape
            assert stacked.shape.tolist() == [cols, rows, experts] and stacked.tensor_type == Q.Q8_0
            decoded = gguf.quants.dequantize(stacked.data, stacked.tensor_type)
            for expert in (0, experts - 1):
                original = hf[f"model.layers.0.{block}.experts.{expert}.{projection}.weight"]
                np.testing.assert_array_equal(
                    decoded[expert], gguf.quants.dequantize(gguf.quants.quantize(original, Q.Q8_0), Q.Q8_0)
                )


def test_deepseek_files_split_kv_b_and_name_the_latent_widths(tmp_path: Path) -> None:
    hf = _safetensors(write_model("tiny-deepseek-v2", tmp_path / "hf") / "model.safetensors")
    (path,) = write_gguf("tiny-deepseek-v2", tmp_path / "deepseek.gguf", "f32")
    tensors, fields = _tensors([path]), _fields(gguf.GGUFReader(path))
    c = PRESETS["tiny-deepseek-v2"].config
    heads, rank, nope, v = c["num_attention_heads"], c["kv_lora_rank"], c["qk_nope_head_dim"], c["v_head_dim"]
    k_b, v_b = np.asarray(tensors["blk.1.attn_k_b.weight"].data), np.asarray(tensors["blk.1.attn_v_b.weight"].data)
    assert k_b.shape == (heads, rank, nope) and v_b.shape == (heads, v, rank)
    assert "blk.1.attn_kv_b.weight" not in tensors
    kv_b = hf["model.layers.1.self_attn.kv_b_proj.weight"]
    np.testing.assert_array_equal(join_kv_b(k_b, v_b), kv_b)
    # Head 2's first key row is the first column of its transposed block.
    np.testing.assert_array_equal(k_b[2][:, 0], kv_b[2 * (nope + v)])
    assert (fields["deepseek2.attention.key_length"], fields["deepseek2.attention.value_length"]) == (rank + 8, rank)
    assert fields["deepseek2.attention.key_length_mla"] == nope + 8
    assert fields["deepseek2.attention.value_length_mla"] == v
    assert fields["deepseek2.attention.head_count_kv"] == 1
    assert (fields["deepseek2.expert_group_count"], fields["deepseek2.expert_group_used_count"]) == (8, 2)
    assert fields["deepseek2.leading_dense_block_count"] == 1 and fields["deepseek2.rope.scaling.type"] == "yarn"
    assert fields["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * 0.707)
    assert "blk.0.ffn_gate_inp.weight" not in tensors and "blk.1.ffn_up_shexp.weight" in tensors


def test_q4_k_m_mix_of_the_new_families_follows_llama_quantize(root: Path) -> None:
    def types(preset: str) -> dict[str, str]:
        return {name: Q(t.tensor_type).name for name, t in _tensors(cached_gguf(preset, root, "q4_k_m")).items()}

    # 8 experts: attn_k and attn_v Q8_0, attn_output Q5_K (here its fallback for rows of 128, Q5_1);
    # the stacked ffn_down takes Q6_K in use_more_bits' layers (2 and 3 of 4; Q8_0 for rows of 64).
    moe = types("tiny-qwen3-moe")
    assert moe["blk.0.attn_k.weight"] == moe["blk.0.attn_v.weight"] == "Q8_0"
    assert moe["blk.0.attn_output.weight"] == "Q5_1"
    assert [moe[f"blk.{layer}.ffn_down_exps.weight"] for layer in (0, 1, 3)] == ["Q5_0", "Q5_0", "Q8_0"]
    assert moe["blk.0.ffn_gate_inp.weight"] == "F32"
    # 4 experts (Mixtral's tiny preset): no bump.
    assert types("tiny-mixtral")["blk.0.attn_k.weight"] == "Q5_0"
    # Phi-3's fused attn_qkv takes Q5_K (Q5_1 for rows of 64).
    assert types("tiny-phi3")["blk.0.attn_qkv.weight"] == "Q5_1"
