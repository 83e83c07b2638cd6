"""MLX-quantized checkpoints of the synthetic presets, as `mlx_lm.convert --quantize` writes them
from the plain checkpoint, and the f32 reference of the weights such a checkpoint holds.

mlx-lm quantizes the weight of every `Linear` and `Embedding` whose rows split into whole groups
(the token embeddings, every projection and, when untied, `lm_head`; with tied embeddings there
is no `lm_head`). `mx.quantize` turns each into three tensors:

- `P.weight`: uint32 `(rows, cols * bits / 32)`, each row's values packed as a little-endian bit
  stream (value `i` at bit `i * bits`);
- `P.scales` and `P.biases`: the checkpoint dtype, `(rows, cols / group_size)`; a weight is
  `scales * q + biases` of its group.

Norms, linear biases and rows that do not split into groups stay as they are, in the checkpoint
dtype. `config.json` gets `quantization` and `quantization_config`, both
`{"group_size": G, "bits": B, "mode": "affine"}`. Everything else (tokenizer, generation config,
the files' split) is the plain checkpoint's. The same preset, bits, group size, dtype and seed
give the same bytes. Needs `mlx` (`mlx[cpu]` on Linux).
"""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from exo.testing.synth import (
    DTYPES,
    PRESETS,
    Preset,
    StoredTensor,
    cached,
    in_parallel,
    random_tensor,
    write_metadata,
    write_safetensors,
    write_weights,
)

MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)
_MX_DTYPES = {"f32": mx.float32, "bf16": mx.bfloat16, "f16": mx.float16}

Plan = list[tuple[str, tuple[int, ...]]]


def is_quantized(shape: tuple[int, ...], group_size: int) -> bool:
    """Whether mlx-lm quantizes a tensor of this shape: every matrix of the presets is the weight
    of a `Linear` or an `Embedding`, and it quantizes those whose rows split into whole groups."""
    return len(shape) == 2 and shape[1] % group_size == 0


def quantization_config(bits: int, group_size: int) -> dict[str, dict[str, int | str]]:
    """The fields mlx-lm adds to `config.json` of a checkpoint it quantized."""
    settings: dict[str, int | str] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    return {"quantization": settings, "quantization_config": dict(settings)}


@dataclass(frozen=True)
class MlxQuantization:
    """How a checkpoint is quantized: bits per weight, weights per group, and the dtype of the
    scales, the biases and the tensors left unquantized."""

    bits: int
    group_size: int
    dtype: str

    def check(self) -> None:
        """Raises `ValueError` for settings mlx does not quantize with."""
        if self.bits not in MLX_BITS:
            raise ValueError(f"MLX quantization takes {', '.join(map(str, MLX_BITS))} bits, not {self.bits}")
        if self.group_size not in MLX_GROUP_SIZES:
            sizes = ", ".join(map(str, MLX_GROUP_SIZES))
            raise ValueError(f"MLX groups are {sizes} weights, not {self.group_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r} (known: {', '.join(DTYPES)})")

    def stored(self, name: str, shape: tuple[int, ...]) -> list[StoredTensor]:
        """What one tensor of the plan is stored as: itself, or its packed values, scales and biases."""
        dtype = DTYPES[self.dtype][0]
        if not is_quantized(shape, self.group_size):
            return [(name, dtype, shape)]
        rows, cols = shape
        stem = name.removesuffix(".weight")
        groups = (rows, cols // self.group_size)
        packed = (rows, cols * self.bits // 32)
        return [(name, "U32", packed), (f"{stem}.scales", dtype, groups), (f"{stem}.biases", dtype, groups)]

    def quantize(self, values: np.ndarray) -> list[mx.array]:
        """The tensor in `dtype`, quantized as mlx-lm quantizes a checkpoint of that dtype. On the
        CPU, so that every machine writes the same bytes."""
        weight = mx.array(values).astype(_MX_DTYPES[self.dtype], stream=mx.cpu)
        if not is_quantized(values.shape, self.group_size):
            return [weight]
        return list(mx.quantize(weight, group_size=self.group_size, bits=self.bits, stream=mx.cpu))

    def dequantized(self, values: np.ndarray) -> np.ndarray:
        """The f32 weights the stored tensor stands for: `scales * q + biases` with the stored
        scales and biases widened to f32 (not rounded back to `dtype`)."""
        parts = self.quantize(values)
        if len(parts) == 1:
            return np.asarray(parts[0].astype(mx.float32, stream=mx.cpu))
        packed, scales, biases = parts
        scales, biases = scales.astype(mx.float32, stream=mx.cpu), biases.astype(mx.float32, stream=mx.cpu)
        weights = mx.dequantize(packed, scales, biases, group_size=self.group_size, bits=self.bits, stream=mx.cpu)
        return np.asarray(weights)


def _raw(array: mx.array) -> bytes:
    """The array's bytes, little-endian as safetensors stores them (numpy has no bfloat16)."""
    if array.dtype in (mx.bfloat16, mx.float16):
        array = array.view(mx.uint16)
    values = np.asarray(array)
    return values.astype(values.dtype.newbyteorder("<")).tobytes()


_MIXTRAL_PROJECTIONS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def _stacked_name(name: str) -> tuple[str, int] | None:
    """mlx-lm's name for the stack holding the expert tensor `name` (`{block}.experts.{e}.{proj}.weight`,
    Mixtral's w1/w2/w3 as gate/down/up), and the expert's index; `None` for other tensors."""
    block, found, rest = name.partition(".experts.")
    if not found:
        return None
    expert, proj, suffix = rest.split(".", 2)
    return f"{block}.switch_mlp.{_MIXTRAL_PROJECTIONS.get(proj, proj)}.{suffix}", int(expert)


Group = tuple[str, list[tuple[str, tuple[int, ...]]]]
"""One stored tensor of an MLX checkpoint: its name and the plan's tensors it stacks (one, or a layer's experts)."""


def _mlx_groups(plan: Plan) -> list[Group]:
    """The plan as mlx-lm's `sanitize` leaves it: each layer's experts stacked per projection
    (`switch_mlp.gate_proj`, ... `[experts, rows, cols]`), every other tensor as it is."""
    groups: list[Group] = []
    stacks: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape in plan:
        stacked = _stacked_name(name)
        if stacked is None:
            groups.append((name, [(name, shape)]))
        elif stacked[0] in stacks:
            stacks[stacked[0]].append((name, shape))
        else:
            stacks[stacked[0]] = [(name, shape)]
            groups.append((stacked[0], stacks[stacked[0]]))
    return groups


def _write_quantized_file(path: Path, plan: Plan, quant: MlxQuantization, seed: int) -> list[StoredTensor]:
    groups = _mlx_groups(plan)
    layout: list[StoredTensor] = []
    for name, members in groups:
        experts = len(members) if _stacked_name(members[0][0]) else None
        for part, dtype, shape in quant.stored(name, members[0][1]):
            layout.append((part, dtype, shape if experts is None else (experts, *shape)))

    def parts(group: Group) -> list[bytes]:
        quantized = [quant.quantize(random_tensor(name, shape, seed)) for name, shape in group[1]]
        return [b"".join(_raw(expert[i]) for expert in quantized) for i in range(len(quantized[0]))]

    data = (part for group_parts in in_parallel(groups, parts) for part in group_parts)
    write_safetensors(path, layout, data, file_format="mlx")
    return layout


def _write_reference_file(path: Path, plan: Plan, quant: MlxQuantization, seed: int) -> list[StoredTensor]:
    layout = [(name, "F32", shape) for name, shape in plan]
    drawn = in_parallel(plan, lambda t: random_tensor(t[0], t[1], seed))
    write_safetensors(path, layout, (quant.dequantized(values).astype("<f4").tobytes() for values in drawn))
    return layout


def _prepare(preset: str, out_dir: str | Path, quant: MlxQuantization) -> tuple[Preset, Path]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    quant.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return PRESETS[preset], out


def write_mlx_model(
    preset: str,
    out_dir: str | Path,
    bits: int = 4,
    group_size: int = 64,
    dtype: str = "f32",
    seed: int = 0,
    num_shards: int = 1,
) -> Path:
    """Writes the MLX-quantized model directory of `preset` (its `dtype` weights quantized to
    `bits` in groups of `group_size`) to `out_dir` and returns it."""
    quant = MlxQuantization(bits, group_size, dtype)
    spec, out = _prepare(preset, out_dir, quant)
    write_metadata(spec, out, dtype, quantization_config(bits, group_size))
    write_weights(spec, out, num_shards, lambda path, plan: _write_quantized_file(path, plan, quant, seed))
    return out


def write_mlx_reference(
    preset: str,
    out_dir: str | Path,
    bits: int = 4,
    group_size: int = 64,
    dtype: str = "f32",
    seed: int = 0,
    num_shards: int = 1,
) -> Path:
    """Writes the plain f32 model directory whose weights are exactly those of `write_mlx_model`'s
    checkpoint with the same arguments (each quantized weight dequantized) to `out_dir` and
    returns it: the reference a quantized forward pass is compared with."""
    quant = MlxQuantization(bits, group_size, dtype)
    spec, out = _prepare(preset, out_dir, quant)
    write_metadata(spec, out, "f32")
    write_weights(spec, out, num_shards, lambda path, plan: _write_reference_file(path, plan, quant, seed))
    return out


def cached_mlx_model(
    preset: str,
    root: str | Path,
    bits: int = 4,
    group_size: int = 64,
    dtype: str = "f32",
    seed: int = 0,
    reference: bool = False,
) -> Path:
    """`root/PRESET-DTYPE-mlxBITS-gGROUP` (with `-f32ref`: its `write_mlx_reference`), written on
    first use (see `synth.cached`)."""
    write = write_mlx_reference if reference else write_mlx_model
    name = f"{preset}-{dtype}-mlx{bits}-g{group_size}" + ("-f32ref" if reference else "")
    return cached(Path(root) / name, lambda out: write(preset, out, bits, group_size, dtype, seed))
