"""Synthetic LLaVA-1.5 checkpoints: llava-hf's layout (`LlavaForConditionalGeneration`) scaled down.

    python -m exo.testing.synth --preset tiny-llava --dtype f32 --out DIR

writes `config.json` with `text_config` (Llama) and `vision_config` (CLIP), the weights under llava-hf's names
(`language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`, the tower's last layer and post-norm included as the hub's files hold them), a tokenizer
with the `<image>` token, llava-hf's chat template in `chat_template.json`, and the image processor's
(`preprocessor_config.json`) and processor's (`processor_config.json`) settings. Same seed, same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exo.inference.vision import CLIP_MEAN, CLIP_STD
from exo.testing.synth import DTYPES, Family, Preset, _llama_config, _write_plain_file, tensor_plan, write_metadata

# llava-hf/llava-1.5-7b-hf's chat template: images before text in each turn, `{% generation %}` marking what the
# assistant said.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Llama 2's special tokens, and LLaVA's image token after them.
LLAVA = Family(
    special_tokens=("<unk>", "<s>", "</s>", "<image>", "<pad>"),
    bos="<s>",
    eos="</s>",
    end_of_turn="</s>",
    chat_template=LLAVA_TEMPLATE,
    adds_bos=True,
)
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class LlavaPreset:
    """A LLaVA shape: the decoder as a Llama preset, the CLIP tower's `vision_config`, LLaVA's own fields."""

    text: Preset
    vision: dict[str, Any]
    fields: dict[str, Any]


LLAVA_PRESETS: dict[str, LlavaPreset] = {
    # LLaVA-1.5's layout at a 112-pixel image (8x8 patches of 14): 64 image tokens, the tower's next-to-last layer.
    "tiny-llava": LlavaPreset(
        Preset(
            LLAVA,
            _llama_config(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=4,
                vocab_size=512,
                rope_theta=10000.0,
                max_position_embeddings=2048,
                rms_norm_eps=1e-5,
            ),
        ),
        {
            "model_type": "clip_vision_model",
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_channels": 3,
            "image_size": 112,
            "patch_size": 14,
            "projection_dim": 32,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        {
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True,
        },
    ),
}


def vision_plan(vision: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """The whole CLIP vision tower's tensors under llava-hf's names."""
    h, inter, p = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    patches = (vision["image_size"] // p) ** 2
    prefix = "vision_tower.vision_model"
    plan: list[tuple[str, tuple[int, ...]]] = [
        (f"{prefix}.embeddings.class_embedding", (h,)),
        (f"{prefix}.embeddings.patch_embedding.weight", (h, vision["num_channels"], p, p)),
        (f"{prefix}.embeddings.position_embedding.weight", (patches + 1, h)),
        (f"{prefix}.pre_layrnorm.weight", (h,)),
        (f"{prefix}.pre_layrnorm.bias", (h,)),
    ]
    for layer in range(vision["num_hidden_layers"]):
        base = f"{prefix}.encoder.layers.{layer}"
        shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "out_proj": (h, h)}
        for proj, shape in shapes.items():
            plan += [(f"{base}.self_attn.{proj}.weight", shape), (f"{base}.self_attn.{proj}.bias", (shape[0],))]
        plan += [(f"{base}.mlp.fc1.weight", (inter, h)), (f"{base}.mlp.fc1.bias", (inter,))]
        plan += [(f"{base}.mlp.fc2.weight", (h, inter)), (f"{base}.mlp.fc2.bias", (h,))]
        for norm in ("layer_norm1", "layer_norm2"):
            plan += [(f"{base}.{norm}.weight", (h,)), (f"{base}.{norm}.bias", (h,))]
    plan += [(f"{prefix}.post_layernorm.weight", (h,)), (f"{prefix}.post_layernorm.bias", (h,))]
    return plan


def llava_plan(spec: LlavaPreset) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint under llava-hf's names: the decoder's under `language_model`."""
    hidden, width = spec.text.config["hidden_size"], spec.vision["hidden_size"]
    decoder = [(f"language_model.{name}", shape) for name, shape in tensor_plan(spec.text)]
    projector = [
        ("multi_modal_projector.linear_1.weight", (hidden, width)),
        ("multi_modal_projector.linear_1.bias", (hidden,)),
        ("multi_modal_projector.linear_2.weight", (hidden, hidden)),
        ("multi_modal_projector.linear_2.bias", (hidden,)),
    ]
    return vision_plan(spec.vision) + projector + decoder


def _write_processor_files(spec: LlavaPreset, out: Path) -> None:
    size = spec.vision["image_size"]
    preprocessor = {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    processor = {
        "image_token": IMAGE_TOKEN,
        "num_additional_image_tokens": 1,
        "patch_size": spec.vision["patch_size"],
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": spec.fields["vision_feature_select_strategy"],
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_TEMPLATE}, indent=2))


def write_llava_model(preset: str, out_dir: str | Path, dtype: str = "f32", seed: int = 0) -> Path:
    """Writes the complete model directory of the LLaVA `preset` to `out_dir` (one weights file) and returns it."""
    if preset not in LLAVA_PRESETS:
        raise ValueError(f"unknown LLaVA preset {preset!r} (known: {', '.join(LLAVA_PRESETS)})")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    spec = LLAVA_PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_metadata(spec.text, out, dtype)
    text_config = json.loads((out / "config.json").read_text())
    image_token_id = LLAVA.special_tokens.index(IMAGE_TOKEN)
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": image_token_id,
        "pad_token_id": LLAVA.special_tokens.index("<pad>"),
        "tie_word_embeddings": False,
        "torch_dtype": text_config.pop("torch_dtype"),
        "transformers_version": text_config.pop("transformers_version"),
        "text_config": text_config,
        "vision_config": spec.vision,
        **spec.fields,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_processor_files(spec, out)
    _write_plain_file(out / "model.safetensors", llava_plan(spec), dtype, seed)
    return out


def synthetic_image(width: int = 150, height: int = 123, seed: int = 0) -> Any:
    """A fixed RGB test picture (a PIL image) of smooth gradients under seeded noise, not square, so resizing and
    cropping both act on it."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        128 + 100 * np.sin(x / 9.0) * np.cos(y / 13.0),
        255 * x / width,
        255 * (1 - y / height),
    ]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
