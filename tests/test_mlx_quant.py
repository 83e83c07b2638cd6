"""MLX-quantized checkpoints on the candle engine, against MLX itself.

The reference is `mlx` (`mx.dequantize`, `mx.quantized_matmul`) and, for whole models, the
checkpoint's own weights dequantized to f32 and run by the engine, and mlx-lm running the
checkpoint. The engine rounds activations to 8 bits per 32 values before its integer dot
products, so products and logits are compared within that rounding's bound; the weights
themselves must decode bit for bit.
"""

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from exo._core import mlx_dequantize, mlx_quantized_matmul  # noqa: E402
from exo.errors import InvalidModelError  # noqa: E402
from exo.testing.synth import cached_model  # noqa: E402
from exo.testing.synth_gguf import cached_gguf  # noqa: E402
from exo.testing.synth_mlx import cached_mlx_model  # noqa: E402
from support.engine_runs import (  # noqa: E402
    PROMPT,
    assert_follows_reference,
    assert_logits_agree,
    forced_logits,
    greedy,
    prompt_logits,
)

MX_DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlx")


def _raw(array: "mx.array") -> bytes:
    """An MLX array's little-endian bytes (bf16 through its bits, which numpy lacks)."""
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.array(array).tobytes()


def _quantized(rows: int, cols: int, bits: int, group_size: int, dtype: str, seed: int) -> tuple:
    """Random weights quantized by `mx.quantize`: (codes, scales, biases)."""
    weights = mx.random.normal((rows, cols), key=mx.random.key(seed)).astype(MX_DTYPES[dtype])
    return mx.quantize(weights, group_size=group_size, bits=bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_dequantization_equals_mx_dequantize(bits: int, group_size: int, dtype: str) -> None:
    rows, cols = 24, 384
    codes, scales, biases = _quantized(rows, cols, bits, group_size, dtype, bits * group_size)
    ours = mlx_dequantize(_raw(codes), _raw(scales), _raw(biases), rows, cols, bits, group_size, dtype)
    ours = np.frombuffer(ours, np.float32).reshape(rows, cols)
    # The exact value of each weight: MLX's result in f32 (in f16 or bf16 it rounds each
    # operation to that dtype, which the engine, computing in f32, does not).
    wide = (scales.astype(mx.float32), biases.astype(mx.float32))
    reference = np.array(mx.dequantize(codes, *wide, group_size=group_size, bits=bits))
    assert np.array_equal(ours.view(np.uint32), reference.view(np.uint32))


class ProductError(NamedTuple):
    """Our product against `mx.quantized_matmul`, and what each activation rounding may move
    each output by."""

    error: np.ndarray
    reference: np.ndarray
    eight_bit: np.ndarray
    bf16: np.ndarray


def _product_error(rows: int, cols: int, rows_of_x: int, bits: int, group_size: int, seed: int) -> ProductError:
    """Our product of `rows_of_x` random inputs with a random `[rows, cols]` MLX matrix."""
    codes, scales, biases = _quantized(rows, cols, bits, group_size, "bf16", seed)
    x = mx.random.normal((rows_of_x, cols), key=mx.random.key(rows_of_x + seed))
    ours = mlx_quantized_matmul(_raw(x), _raw(codes), _raw(scales), _raw(biases), rows, cols, bits, group_size, "bf16")
    ours = np.frombuffer(ours, np.float32).reshape(rows_of_x, rows)
    wide = (scales.astype(mx.float32), biases.astype(mx.float32))
    reference = np.array(mx.quantized_matmul(x, codes, *wide, transpose=True, group_size=group_size, bits=bits))
    weights = np.array(mx.dequantize(codes, *wide, group_size=group_size, bits=bits))
    # Rounding x to 8 bits per 32 values moves each product by at most half a step (1/254 of
    # the block's largest magnitude) times the block's weights.
    x_blocks = np.abs(np.array(x)).reshape(rows_of_x, cols // 32, 32).max(axis=2) / 254
    w_blocks = np.abs(weights).reshape(rows, cols // 32, 32).sum(axis=2)
    # bf16 keeps 8 significant bits: each of the two roundings moves a product by 2^-9 of it.
    bf16 = np.abs(np.array(x)) @ np.abs(weights).T * 2.0**-8
    return ProductError(np.abs(ours - reference), reference, x_blocks @ w_blocks.T, bf16)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows_of_x", [1, 5, 16])
def test_products_match_mx_quantized_matmul(bits: int, group_size: int, rows_of_x: int) -> None:
    got = _product_error(80, 640, rows_of_x, bits, group_size, 7 * bits + group_size)
    bound = got.eight_bit + 1e-4 * (1 + np.abs(got.reference))
    assert np.all(got.error <= bound), got.error.max()
    # The bound is loose; in practice the error is a small fraction of the outputs' spread.
    assert got.error.max() <= 0.01 * np.abs(got.reference).max()


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_prompt_products_match_mx_quantized_matmul(bits: int) -> None:
    """A prompt's product (32 input rows, 96 weight rows): on a CPU with AMX it decodes the
    weights to bf16 and rounds the activations to bf16, elsewhere it takes the 8-bit path."""
    got = _product_error(96, 640, 32, bits, 64, 11 * bits)
    bound = np.maximum(got.eight_bit, got.bf16) + 1e-4 * (1 + np.abs(got.reference))
    assert np.all(got.error <= bound), got.error.max()
    assert got.error.max() <= 0.01 * np.abs(got.reference).max()


@pytest.mark.parametrize(
    ("preset", "bits", "dtype"),
    [("tiny-llama-k", 4, "bf16"), ("tiny-llama-k", 8, "f32"), ("tiny-qwen2", 4, "f16"), ("tiny-qwen3", 8, "bf16")],
)
async def test_a_quantized_checkpoint_gives_its_dequantized_weights_logits(
    root: Path, preset: str, bits: int, dtype: str
) -> None:
    model = cached_mlx_model(preset, root, bits=bits, group_size=64, dtype=dtype)
    reference = cached_mlx_model(preset, root, bits=bits, group_size=64, dtype=dtype, reference=True)
    layers = 4
    ours, theirs = await prompt_logits(str(model), layers), await prompt_logits(str(reference), layers)
    # As for GGUF blocks: 8-bit activations keep the logits within a few percent of their range.
    assert np.abs(ours - theirs).max() <= 0.03 * np.abs(theirs).max()
    await assert_follows_reference(str(model), str(reference), layers, 0.03, 32)


async def test_quantized_tokens_equal_the_dequantized_weights_and_every_split(root: Path) -> None:
    for bits in (4, 8):
        model = str(cached_mlx_model("tiny-llama-k", root, bits=bits, group_size=64, dtype="bf16"))
        reference = str(cached_mlx_model("tiny-llama-k", root, bits=bits, group_size=64, dtype="bf16", reference=True))
        alone = await greedy(model, 4, 32)
        assert alone == await greedy(reference, 4, 32), bits
        assert await greedy(model, 4, 32, cuts=(1,)) == alone
        assert await greedy(model, 4, 32, cuts=(0, 2)) == alone


async def test_logits_follow_mlx_lm_running_the_same_checkpoint(root: Path) -> None:
    """mlx-lm multiplies f32 activations by the same weights: along its greedy path our logits
    stay within the activation rounding's few percent of its own."""
    mlx_lm = pytest.importorskip("mlx_lm")
    model = cached_mlx_model("tiny-llama-k", root, bits=4, group_size=64, dtype="f32")
    loaded, _ = mlx_lm.load(str(model))
    cache = mlx_lm.models.cache.make_prompt_cache(loaded)
    theirs, path, x = [], [], mx.array([PROMPT])
    for _ in range(16):
        logits = np.array(loaded(x, cache=cache)[0, -1])
        theirs.append(logits)
        path.append(int(logits.argmax()))
        x = mx.array([[path[-1]]])
    assert_logits_agree(await forced_logits(str(model), 4, path[:-1]), theirs, 0.03)


async def test_a_gguf_node_and_an_mlx_node_serve_one_model(root: Path) -> None:
    """Layers 0-1 from a Q8_0 GGUF, 2-3 from the MLX 4-bit checkpoint of the same weights (as
    when one node's engine loads the GGUF and another's the MLX repo): the f32 model's tokens."""
    preset = "tiny-llama"
    (gguf_file,) = cached_gguf(preset, root, "q8_0")
    mlx_dir = cached_mlx_model(preset, root, bits=4, group_size=64, dtype="bf16")
    f32_dir = cached_model(preset, root / "f32", "f32")
    mixed = await greedy([str(gguf_file), str(mlx_dir)], 4, 8, cuts=(1,))
    assert mixed == await greedy(str(f32_dir), 4, 8)


async def test_a_packed_weight_without_its_scales_fails_clearly(root: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    model = cached_mlx_model("tiny-llama-k", root, bits=4, group_size=64, dtype="f32")
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in model.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.biases"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "mlx"})
    with pytest.raises(InvalidModelError, match=r"model\.layers\.1\.mlp\.down_proj\.biases is missing"):
        await prompt_logits(str(broken), 4)
