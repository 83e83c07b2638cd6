"""The synthetic model generator: deterministic, complete, and shaped like the real models."""

import hashlib
import json
from pathlib import Path

import jinja2
import numpy as np
from tokenizers import Tokenizer

from exo.testing.corpus import CORPUS
from exo.testing.synth import PRESETS, tensor_plan, to_bfloat16_bits, write_model


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = _digest(write_model("tiny-qwen3", tmp_path / "a", seed=3))
    b = _digest(write_model("tiny-qwen3", tmp_path / "b", seed=3))
    c = _digest(write_model("tiny-qwen3", tmp_path / "c", seed=4))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["tokenizer.json"] == c["tokenizer.json"]


def test_index_covers_every_tensor_with_whole_layers_per_file(tmp_path: Path) -> None:
    out = write_model("tiny-llama-untied", tmp_path, dtype="bf16", num_shards=3)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == {name for name, _ in tensor_plan(PRESETS["tiny-llama-untied"])}
    files_per_layer: dict[str, set[str]] = {}
    for name, file in index.items():
        if name.startswith("model.layers."):
            files_per_layer.setdefault(name.split(".")[2], set()).add(file)
    assert all(len(files) == 1 for files in files_per_layer.values())
    assert index["model.embed_tokens.weight"].startswith("model-00001")
    assert index["lm_head.weight"] == index["model.norm.weight"] == "model-00003-of-00003.safetensors"
    for file in set(index.values()):
        assert (out / file).stat().st_size > 0


def test_config_fields(tmp_path: Path) -> None:
    qwen3 = json.loads((write_model("tiny-qwen3", tmp_path / "q") / "config.json").read_text())
    assert (qwen3["model_type"], qwen3["head_dim"], qwen3["tie_word_embeddings"]) == ("qwen3", 32, False)
    llama = json.loads((write_model("tiny-llama", tmp_path / "l") / "config.json").read_text())
    assert llama["rope_scaling"]["rope_type"] == "llama3" and llama["tie_word_embeddings"]
    generation = json.loads((tmp_path / "l" / "generation_config.json").read_text())
    assert len(generation["eos_token_id"]) == 2


def test_large_preset_shapes_match_the_real_models() -> None:
    llama = dict(tensor_plan(PRESETS["llama-3.2-1b"]))
    assert llama["model.embed_tokens.weight"] == (128256, 2048)
    assert llama["model.layers.15.self_attn.k_proj.weight"] == (512, 2048)
    assert llama["model.layers.0.mlp.down_proj.weight"] == (2048, 8192)
    assert "lm_head.weight" not in llama
    total = sum(int(np.prod(shape)) for shape in llama.values())
    assert 1_230_000_000 < total < 1_240_000_000
    qwen = dict(tensor_plan(PRESETS["qwen2.5-0.5b"]))
    assert qwen["model.layers.23.self_attn.q_proj.bias"] == (896,)
    assert qwen["model.layers.0.self_attn.k_proj.weight"] == (128, 896)


def test_tokenizer_round_trips_multibyte_text(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_file(str(write_model("tiny-llama", tmp_path) / "tokenizer.json"))
    for text in (CORPUS, "Größe 日本語 🙂🚀 café"):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("hi").ids[0] == tokenizer.token_to_id("<|begin_of_text|>")


def test_chat_template_renders(tmp_path: Path) -> None:
    config = json.loads((write_model("tiny-qwen2", tmp_path) / "tokenizer_config.json").read_text())
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(config["chat_template"]).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_bfloat16_rounds_to_nearest_even() -> None:
    values = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-9, -2.5], dtype=np.float32)
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
    assert to_bfloat16_bits(values).tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F80, 0xC020]
