"""Images for vision models (LLaVA-1.5): decoding what a request sends, preprocessing it as the model's
`CLIPImageProcessor` does, and the prompt as LLaVA's processor makes it.

Preprocessing runs here, with Pillow, because transformers' own image processor is Pillow code: resizing the
shortest side with Pillow's bicubic filter, a centre crop, rescaling and normalizing in numpy give the same pixel
values as transformers, bit for bit, where a second resampler would differ in the last digits. The node then carries
the pixel values to the first shard, which embeds them; the prompt carries one `<image>` token per image feature,
as `LlavaProcessor` expands it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)
# transformers' `OPENAI_CLIP_MEAN` and `OPENAI_CLIP_STD`, `CLIPImageProcessor`'s defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# `CLIPVisionConfig`'s defaults, and the tower LLaVA's config makes when it gives none.
CLIP_DEFAULTS = {"image_size": 224, "patch_size": 32}
LLAVA_VISION_DEFAULTS = {"image_size": 336, "patch_size": 14}
# The `model_type`s of the models that take images.
VISION_MODEL_TYPES = ("llava",)
# Pillow's BICUBIC, `CLIPImageProcessor`'s resampling filter.
BICUBIC = 3


class ImageError(ValueError):
    """An image that cannot be read or used; the message says what was wrong."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ImageError(f"{path} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def _square(value: Any, key: str | None = None) -> int:
    """A size entry of `preprocessor_config.json`: an int, or a dict with `key` or a square `height`/`width`."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if key is not None and key in value:
            return int(value[key])
        if "height" in value and value.get("height") == value.get("width"):
            return int(value["height"])
    raise ImageError(f"image size {value!r} is not supported (a shortest edge and a square crop are)")


@dataclass(frozen=True)
class ImageProcessor:
    """What a LLaVA model does to an image before its tower sees it, and how many prompt tokens each image takes."""

    shortest_edge: int
    crop: int
    resample: int
    rescale_factor: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    do_resize: bool
    do_center_crop: bool
    do_rescale: bool
    do_normalize: bool
    image_token: str
    tokens_per_image: int

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ImageProcessor | None:
        """The processor of the model in `model_dir`, or None when the model takes no images (not LLaVA)."""
        model_dir = Path(model_dir)
        config = _read_json(model_dir / "config.json")
        if config.get("model_type") not in VISION_MODEL_TYPES:
            return None
        given = config.get("vision_config")
        vision = {**CLIP_DEFAULTS, **given} if isinstance(given, dict) else LLAVA_VISION_DEFAULTS
        patches = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
        keeps_class = config.get("vision_feature_select_strategy", "default") == "full"
        settings = _read_json(model_dir / "preprocessor_config.json")
        processor = _read_json(model_dir / "processor_config.json")
        shortest = _square(settings.get("size", {"shortest_edge": 224}), "shortest_edge")
        crop = _square(settings.get("crop_size", 224))
        if shortest < crop:
            raise ImageError(f"a shortest edge of {shortest} under a crop of {crop} pixels is not supported")
        if crop != int(vision["image_size"]):
            raise ImageError(f"the image processor crops {crop} pixels but the tower takes {vision['image_size']}")
        return cls(
            shortest_edge=shortest,
            crop=crop,
            resample=int(settings.get("resample", BICUBIC)),
            rescale_factor=float(settings.get("rescale_factor", 1 / 255)),
            mean=tuple(float(m) for m in settings.get("image_mean", CLIP_MEAN)),
            std=tuple(float(s) for s in settings.get("image_std", CLIP_STD)),
            do_resize=bool(settings.get("do_resize", True)),
            do_center_crop=bool(settings.get("do_center_crop", True)),
            do_rescale=bool(settings.get("do_rescale", True)),
            do_normalize=bool(settings.get("do_normalize", True)),
            image_token=str(processor.get("image_token", "<image>")),
            tokens_per_image=patches + int(keeps_class),
        )

    def pixel_values(self, images: list[Any]) -> np.ndarray:
        """`[n, 3, crop, crop]` float32 pixel values of PIL `images`, as `CLIPImageProcessor` makes them."""
        return np.stack([self._one(image) for image in images])

    def _one(self, image: Any) -> np.ndarray:
        image = _rgb(image)
        if self.do_resize:
            width, height = image.size
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(self.shortest_edge * long / short)
            size = (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)
            if size != image.size:
                image = image.resize(size, resample=self.resample)
        pixels = np.array(image)  # (height, width, 3) uint8
        if self.do_center_crop:
            height, width = pixels.shape[:2]
            if height < self.crop or width < self.crop:
                raise ImageError(f"an image of {width}x{height} pixels is smaller than the {self.crop}-pixel crop")
            top, left = (height - self.crop) // 2, (width - self.crop) // 2
            pixels = pixels[top : top + self.crop, left : left + self.crop]
        # As transformers: rescaled in float64, then float32; normalized in float32.
        scaled = pixels.astype(np.float64) * self.rescale_factor if self.do_rescale else pixels
        values: np.ndarray = scaled.astype(np.float32)
        if self.do_normalize:
            values = (values - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return np.ascontiguousarray(values.transpose(2, 0, 1), dtype=np.float32)

    def expand_prompt(self, prompt: str, bos_token: str | None) -> str:
        """The prompt as `LlavaProcessor` tokenizes it: each image token repeated once per image feature, and the
        BOS token in front when the chat template did not put it there."""
        expanded = prompt.replace(self.image_token, self.image_token * self.tokens_per_image)
        if bos_token and not expanded.startswith(bos_token):
            return bos_token + expanded
        return expanded


async def image_processor_of(repo_id_or_path: str) -> ImageProcessor | None:
    """The image processor of a model (a registry id's repo, a Hugging Face repo or a local directory), or None when
    the model takes no images."""
    from exo.errors import ExoError
    from exo.inference.tokenizers import model_dir_of

    try:
        model_dir = await model_dir_of(repo_id_or_path)
    except (ExoError, OSError):
        logger.debug("No model directory for %s; taken as a model without images", repo_id_or_path, exc_info=True)
        return None
    return None if model_dir is None else ImageProcessor.from_model_dir(model_dir)


def vision_messages(messages: list[dict[str, str]], images: list[list[str]]) -> list[dict[str, Any]]:
    """Messages as a vision model's chat template takes them: each content a list of an image part per image, then
    its text as a text part."""
    return [
        {"role": m["role"], "content": [{"type": "image"}] * len(urls) + [{"type": "text", "text": m["content"]}]}
        for m, urls in zip(messages, images, strict=True)
    ]


def _rgb(image: Any) -> Any:
    """`image` in RGB, any transparency composited onto white (as transformers converts it)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _open(data: bytes, what: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{what} is not a readable image: {e}") from e
    return image


def image_from_data_url(url: str) -> Any:
    """The PIL image of a `data:image/...;base64,...` URL."""
    head, sep, payload = url.partition(",")
    if not head.startswith("data:image/") or not sep or not head.endswith(";base64"):
        raise ImageError("an image URL must be a base64 data URL (data:image/png;base64,...)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the image data URL's base64 payload is invalid: {e}") from e
    return _open(data, "the image data URL")


def image_from_file(path: str | Path) -> Any:
    """The PIL image in the local file `path` (a path, or a `file://` URL)."""
    text = str(path)
    local = Path(text.removeprefix("file://"))
    try:
        data = local.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read the image file {local}: {e.strerror or e}") from e
    return _open(data, f"the file {local}")


__all__ = [
    "VISION_MODEL_TYPES",
    "ImageError",
    "ImageProcessor",
    "image_from_data_url",
    "image_from_file",
    "image_processor_of",
    "vision_messages",
]
