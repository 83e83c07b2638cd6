"""GGUF models on the candle engine, against the same weights in f32.

The synthetic generator writes each preset both as a safetensors directory and as GGUF files
(as llama.cpp's converter and quantizer would). An f32 GGUF must give the safetensors logits
(of the config llama.cpp reads back: `llama_cpp_config`); a quantized GGUF must give the logits
of its own dequantized weights (run in f32) up to the rounding of the activations (8 bits per 32
values; 14 bits per 256 in a long prompt's K-format products), and the same greedy tokens; any
split of its layers across shards, or of its tensors across files, must give the same tokens as
one shard. Each family the engine reads from GGUF is held to these: Llama (Mistral), Qwen 2 and
3, Gemma 2 and 3, Phi-3 (with LongRoPE and a partial rotary width), Qwen3-MoE and Mixtral.
"""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFReader
from safetensors.numpy import load_file, save_file

from exo._core import Shard, dequantize, expert_routes, quantize
from exo.errors import InvalidArgumentError, InvalidModelError
from exo.inference.candle import CandleInferenceEngine
from exo.testing.synth import PRESETS, cached_model
from exo.testing.synth_gguf import (
    cached_gguf,
    llama_cpp_config,
    write_gguf,
)
from support.engine_runs import assert_follows_reference, greedy, prompt_logits
from support.gguf_reference import dequantized_checkpoint, with_config
from support.solo_cli import run_solo

GOLDEN = Path(__file__).parent / "golden"

# The families added to Llama and Qwen: each is held to the f32, quantized and split checks.
FAMILIES = [
    "tiny-gemma2",
    "tiny-gemma3",
    "tiny-phi3",
    "tiny-phi3-partial",
    "tiny-qwen3-moe",
    "tiny-mixtral",
    "tiny-deepseek-v2-lite",
    "tiny-deepseek-v2",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


def _layers(path: Path) -> int:
    reader = GGUFReader(path)
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    return int(reader.fields[f"{architecture}.block_count"].parts[-1][0])


def _reference_dir(preset: str, root: Path) -> Path:
    """The preset's f32 safetensors directory with the config llama.cpp reads from its GGUF."""
    directory = cached_model(preset, root / "safetensors", "f32")
    out = root / "as-llama-cpp" / preset
    return out if out.exists() else with_config(directory, llama_cpp_config(preset), out)


@pytest.mark.parametrize("preset", ["tiny-llama-k", "tiny-qwen2", "tiny-qwen3", *FAMILIES])
async def test_an_f32_gguf_gives_the_safetensors_logits(root: Path, preset: str) -> None:
    (file,) = cached_gguf(preset, root, "f32")
    directory = _reference_dir(preset, root)
    layers = _layers(file)
    ours, reference = await prompt_logits(str(file), layers), await prompt_logits(str(directory), layers)
    # Gemma 3's GGUF holds the embedding rows of its tokenizer only: the logits of those tokens.
    assert ours.size == (PRESETS[preset].config["vocab_size"] if preset != "tiny-gemma3" else 405)
    reference = reference[: ours.size]
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4 * np.abs(reference).max())


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-mixtral", "tiny-deepseek-v2-lite", "tiny-deepseek-v2"])
def test_an_f32_gguf_routes_to_transformers_experts(root: Path, preset: str) -> None:
    (file,) = cached_gguf(preset, root, "f32")
    golden = json.loads((GOLDEN / f"{preset}.json").read_text())
    routes = expert_routes(str(file), golden["prompt_ids"])
    sparse = {str(layer): chosen for layer, chosen in enumerate(routes) if chosen is not None}
    # tiny-qwen3-moe's dense layer 2 is stored with a plain MLP and no router.
    assert sparse == golden["expert_routes"]


# How far 8-bit activations move each family's logits, as a fraction of their range, along 16
# greedy steps. Gemma's norms after attention and MLP scale each sublayer's output (and its
# rounding) up to the residual stream's size: measured up to 4.5% for Gemma 2; Gemma 3's q/k
# norms (weights near 2 in these synthetic models) sharpen its attention further, so rounding
# moves its scores most: measured up to 15%. The others: up to 2.1%. (An F16 file of the same
# weights: 0.) The test below holds every family's blocks exactly.
ROUNDING_BOUNDS = {"tiny-gemma2": 0.06, "tiny-gemma3": 0.2}


@pytest.mark.parametrize("ggml_type", ["q8_0", "q4_k_m"])
@pytest.mark.parametrize("preset", FAMILIES)
async def test_a_quantized_family_gguf_follows_its_dequantized_weights(
    root: Path, tmp_path: Path, preset: str, ggml_type: str
) -> None:
    (file,) = cached_gguf(preset, root, ggml_type)
    reference_dir = dequantized_checkpoint(file, preset, root, tmp_path / "f32")
    layers = _layers(file)
    bound = ROUNDING_BOUNDS.get(preset, 0.03)
    await assert_follows_reference(str(file), str(reference_dir), layers, bound, 16)


@pytest.mark.parametrize("preset", FAMILIES)
async def test_a_q8_0_family_gguf_is_its_dequantized_weights_quantized_at_load(
    root: Path, tmp_path: Path, preset: str
) -> None:
    # Quantizing the decoded Q8_0 values again gives the same blocks, which then go through
    # the same kernels with the same activation rounding: the logits are the same bits.
    (file,) = cached_gguf(preset, root, "q8_0")
    reference_dir = dequantized_checkpoint(file, preset, root, tmp_path / "f32")
    layers = _layers(file)
    ours, requantized = (
        await prompt_logits(str(file), layers),
        await prompt_logits(str(reference_dir), layers, quantize="q8_0"),
    )
    np.testing.assert_array_equal(ours, requantized)


@pytest.mark.parametrize("preset", FAMILIES)
async def test_family_layer_and_file_splits_give_one_shards_tokens(root: Path, preset: str) -> None:
    (file,) = cached_gguf(preset, root, "q8_0")
    layers = _layers(file)
    alone = await greedy(str(file), layers, 12)
    assert await greedy(str(file), layers, 12, cuts=(1,)) == alone
    assert await greedy(str(file), layers, 12, cuts=(0, 2)) == alone
    for split in (2, 3):
        parts = cached_gguf(preset, root, "q8_0", split=split)
        assert len(parts) == split
        assert await greedy(str(parts[0]), layers, 12, cuts=(1,)) == alone


# The formats this project's block kernels multiply; the others run on candle's kernels.
OWN_KERNELS = ["q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "q4_k_m"]


@pytest.mark.parametrize("ggml_type", [*OWN_KERNELS, "q5_0", "q3_k"])
async def test_a_quantized_gguf_gives_its_dequantized_weights_logits(
    root: Path, tmp_path: Path, ggml_type: str
) -> None:
    (file,) = cached_gguf("tiny-llama-k", root, ggml_type)
    reference_dir = dequantized_checkpoint(file, "tiny-llama-k", root, tmp_path / "f32")
    layers = _layers(file)
    ours = await prompt_logits(str(file), layers)
    reference = await prompt_logits(str(reference_dir), layers)
    # Rounding activations to 8 bits per 32 values moves each product by at most half a step
    # (1/254 of the block's largest value) per term; through 4 layers that stays within a few
    # percent of the logits' range on these weights, far below the gap between tokens.
    scale = np.abs(reference).max()
    assert np.abs(ours - reference).max() <= 0.03 * scale, (np.abs(ours - reference).max(), scale)
    # Along the reference's greedy path, every step's choice is the same wherever the
    # reference's best two logits are further apart than the error allowed above.
    await assert_follows_reference(str(file), str(reference_dir), layers, 0.03, 32)
    if ggml_type in OWN_KERNELS:
        assert await greedy(str(file), layers, 32) == await greedy(str(reference_dir), layers, 32)


# A prompt long enough for the K formats' prompt kernel (12 rows or more on AVX-512 VNNI).
LONG_PROMPT = [(7 * i + 3) % 500 for i in range(40)]


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    return set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()


def _has_vnni() -> bool:
    """Whether this CPU runs the block kernels' AVX-512 VNNI paths."""
    return {"avx512bw", "avx512_vnni"} <= _cpu_flags()


def _has_amx() -> bool:
    """Whether this CPU may run K-format prompts on AMX tiles (bf16 weights and activations)."""
    return {"amx_tile", "amx_bf16"} <= _cpu_flags()


@pytest.mark.parametrize("ggml_type", ["q4_k", "q5_k", "q6_k", "q4_k_m"])
async def test_a_long_prompt_gives_the_dequantized_weights_logits(root: Path, tmp_path: Path, ggml_type: str) -> None:
    (file,) = cached_gguf("tiny-llama-k", root, ggml_type)
    reference_dir = dequantized_checkpoint(file, "tiny-llama-k", root, tmp_path / "f32")
    layers = _layers(file)
    logits = []
    for model in (file, reference_dir):
        engine = CandleInferenceEngine()
        out, _ = await engine.infer_tensor("r", Shard(str(model), 0, layers - 1, layers), np.array([LONG_PROMPT]))
        logits.append(np.asarray(out, dtype=np.float32).reshape(-1))
    ours, reference = logits
    # The prompt kernel rounds activations to 14 bits per 256 values (each product moves by at
    # most 1/16382 of the block's largest value per term, some 60 times less than 8 bits per
    # 32); the LM head, on the last position alone, keeps the 8-bit rounding. Measured: 0.5%
    # of the logits' range, against 0.9-1.4% when the same prompt is one row short of the
    # kernel. On AMX (24 rows or more) weights and activations are each rounded to bf16, a
    # relative 2^-9 per factor: measured 0.74-0.94%. Without AVX-512 VNNI the 8-bit bound of
    # the test above holds.
    scale = np.abs(reference).max()
    bound = 0.015 if _has_amx() else 0.01 if _has_vnni() else 0.03
    assert np.abs(ours - reference).max() <= bound * scale, (np.abs(ours - reference).max(), scale)


async def test_layer_splits_and_file_splits_give_one_shards_tokens(root: Path) -> None:
    (file,) = cached_gguf("tiny-llama-k", root, "q4_k_m")
    layers = _layers(file)
    alone = await greedy(str(file), layers, 16)
    assert await greedy(str(file), layers, 16, cuts=(1,)) == alone
    assert await greedy(str(file), layers, 16, cuts=(0, 2)) == alone
    parts = cached_gguf("tiny-llama-k", root, "q4_k_m", split=3)
    assert len(parts) == 3 and parts[0].name.endswith("-00001-of-00003.gguf")
    assert await greedy(str(parts[0]), layers, 16, cuts=(1,)) == alone
    # A directory holding the model's one GGUF names it.
    assert await greedy(str(parts[0].parent), layers, 16) == alone


async def test_load_time_quantization_gives_the_quantized_weights_logits(root: Path, tmp_path: Path) -> None:
    directory = cached_model("tiny-llama-k", root / "safetensors", "f32")
    layers = 4
    for block_type in ["q8_0", "q4_0", "q4_k"]:
        # The reference: every matrix the engine quantizes (all but the embedding, which is
        # only looked up), quantized and decoded back by the same quantizer, run in f32.
        reference_dir = tmp_path / block_type
        shutil.copytree(directory, reference_dir)
        tensors = load_file(directory / "model.safetensors")
        for name, values in tensors.items():
            if values.ndim == 2 and name != "model.embed_tokens.weight":
                rows, cols = values.shape
                blocks = quantize(values.astype(np.float32).tobytes(), rows, cols, block_type)
                tensors[name] = np.frombuffer(dequantize(blocks, rows, cols, block_type), np.float32).reshape(
                    rows, cols
                )
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        values = tensors["lm_head.weight"].astype(np.float32)
        blocks = quantize(values.tobytes(), *values.shape, block_type)
        tensors["lm_head.weight"] = np.frombuffer(dequantize(blocks, *values.shape, block_type), np.float32).reshape(
            values.shape
        )
        config = json.loads((directory / "config.json").read_text())
        (reference_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
        save_file(tensors, reference_dir / "model.safetensors")
        ours = await prompt_logits(str(directory), layers, quantize=block_type)
        reference = await prompt_logits(str(reference_dir), layers)
        assert np.abs(ours - reference).max() <= 0.03 * np.abs(reference).max(), block_type
    with pytest.raises(InvalidArgumentError, match="q9_0"):
        CandleInferenceEngine(quantize="q9_0")


async def test_bad_gguf_files_fail_clearly(root: Path, tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InvalidModelError, match='architecture "gpt2" is not supported'):
        await prompt_logits(str(tmp_path / "gpt2.gguf"), 1)
    (file,) = cached_gguf("tiny-llama-k", root, "q8_0")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(InvalidModelError, match="past the end of the file"):
        await prompt_logits(str(truncated), 4)
    (tmp_path / "not.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(InvalidModelError, match="not a readable GGUF file"):
        await prompt_logits(str(tmp_path / "not.gguf"), 4)


def _metadata_only_gguf(path: Path, arch: str, keys: dict[str, object], tensors: dict[str, np.ndarray]) -> Path:
    """A GGUF of a tiny model's hyperparameters (and `keys`) with only `tensors`: enough for its
    config to be read."""
    writer = gguf.GGUFWriter(path, arch)
    base: dict[str, object] = {
        "block_count": 2,
        "context_length": 256,
        "embedding_length": 32,
        "feed_forward_length": 64,
        "attention.head_count": 4,
    }
    for name, value in (base | keys).items():
        if isinstance(value, str):
            writer.add_string(f"{arch}.{name}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{arch}.{name}", value)
        else:
            writer.add_uint32(f"{arch}.{name}", int(str(value)))
    for name, values in {"token_embd.weight": np.zeros((8, 32), dtype=np.float32), **tensors}.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _without_tensor(source: Path, out: Path, dropped: str) -> Path:
    """A copy of the single-file GGUF `source` without the tensor `dropped`."""
    reader = GGUFReader(source)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    writer = gguf.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.name != dropped:
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


async def test_bad_family_gguf_files_name_what_is_wrong(root: Path, tmp_path: Path) -> None:
    moe = _metadata_only_gguf(tmp_path / "moe.gguf", "qwen3moe", {"expert_count": 8}, {})
    with pytest.raises(InvalidModelError, match=r"metadata qwen3moe\.expert_used_count is missing"):
        await prompt_logits(str(moe), 2)
    factors = {"rope_factors_long.weight": np.ones(2, dtype=np.float32)}
    phi3 = _metadata_only_gguf(tmp_path / "phi3.gguf", "phi3", {}, factors)
    with pytest.raises(InvalidModelError, match=r"tensor rope_factors_short\.weight is missing"):
        await prompt_logits(str(phi3), 2)
    yarn = _metadata_only_gguf(tmp_path / "gemma3.gguf", "gemma3", {"rope.scaling.type": "yarn"}, {})
    with pytest.raises(InvalidModelError, match='rope scaling "yarn" is not supported for gemma3'):
        await prompt_logits(str(yarn), 2)
    (mixtral,) = cached_gguf("tiny-mixtral", root, "f32")
    broken = _without_tensor(mixtral, tmp_path / "mixtral.gguf", "blk.1.ffn_up_exps.weight")
    with pytest.raises(InvalidModelError, match=r"tensor blk\.1\.ffn_up_exps\.weight \(or blk\.1\.ffn_up\.0\.weight\)"):
        await prompt_logits(str(broken), 4)


@pytest.mark.parametrize(("preset", "ggml_type"), [("tiny-gemma3", "q8_0"), ("tiny-qwen3-moe", "q4_k_m")])
def test_the_cli_runs_a_family_gguf(tmp_path: Path, preset: str, ggml_type: str) -> None:
    (file,) = write_gguf(preset, tmp_path / f"{preset}.gguf", ggml_type)
    done = run_solo(tmp_path, "run", str(file), "--prompt", "Hello!", "--max-generate-tokens", "4")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Generated 4 tokens" in done.stdout
