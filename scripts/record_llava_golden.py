"""Records golden values from Hugging Face transformers for the tiny LLaVA preset (`exo.testing.synth_llava`).

Run by hand (not in CI) in an environment with torch, transformers and Pillow, from the repository root:

    PYTHONPATH=python python scripts/record_llava_golden.py

It writes `tests/golden/llava/tiny-llava.json`: a chat with the fixed synthetic picture rendered by the processor's
chat template, the prompt ids `LlavaProcessor` makes of it (the image token repeated once per feature, BOS in
front), a sample of the pixel values its `CLIPImageProcessor` (Pillow backend) makes of the picture, the f32 logits
of the last 3 prompt positions of `LlavaForConditionalGeneration`, and 40 greedy tokens (EOS ignored).
`tests/test_llava.py` checks the engine, the API and the preprocessing against them.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoProcessor, CLIPImageProcessorPil, LlavaForConditionalGeneration

from exo.testing.synth_llava import LLAVA_PRESETS, synthetic_image, write_llava_model

MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture? Tell me about the cluster"}],
    }
]
GREEDY_STEPS = 40
# Every this many-th pixel value (of the flattened `[1, 3, size, size]` array) is kept.
PIXEL_STRIDE = 97


@torch.inference_mode()
def _greedy(model: torch.nn.Module, ids: torch.Tensor, pixels: torch.Tensor) -> tuple[list[list[float]], list[int]]:
    """Logits of the last 3 prompt positions (a prefill without the last 2, then 2 cached steps) and greedy tokens."""
    out = model(input_ids=ids[:, :-2], pixel_values=pixels, use_cache=True)
    cache, last3 = out.past_key_values, [out.logits[0, -1]]
    for position in (-2, -1):
        out = model(input_ids=ids[:, position].unsqueeze(1), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        last3.append(out.logits[0, -1])
    token = int(last3[-1].argmax())
    generated = [token]
    for _ in range(GREEDY_STEPS - 1):
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
        generated.append(token)
    return [row.float().tolist() for row in last3], generated


def record(preset: str, out_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_llava_model(preset, Path(tmp) / "f32", dtype="f32", seed=0)
        image_processor = CLIPImageProcessorPil.from_pretrained(model_dir)
        processor = AutoProcessor.from_pretrained(model_dir, image_processor=image_processor)
        prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
        inputs = processor(images=synthetic_image(), text=prompt, return_tensors="pt")
        ids, pixels = inputs["input_ids"], inputs["pixel_values"]
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
        # The whole prompt at once gives the same last logits as the prefill and steps.
        whole = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
        last3, generated = _greedy(model, ids, pixels)
        assert torch.allclose(whole, torch.tensor(last3[-1]), atol=1e-5)
        flat = pixels.flatten()
        golden = {
            "preset": preset,
            "seed": 0,
            "messages": MESSAGES,
            "prompt": prompt,
            "prompt_ids": ids[0].tolist(),
            "pixel_shape": list(pixels.shape),
            "pixel_stride": PIXEL_STRIDE,
            "pixel_sample": flat[::PIXEL_STRIDE].tolist(),
            "pixel_sum": float(flat.double().sum()),
            "logits_last3": last3,
            "greedy_tokens": generated,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        }
    (out_dir / f"{preset}.json").write_text(json.dumps(golden))
    print(f"{preset}: {len(golden['prompt_ids'])} prompt tokens, greedy {generated[:8]}...")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(LLAVA_PRESETS), choices=list(LLAVA_PRESETS))
    parser.add_argument("--out", type=Path, default=Path("tests/golden/llava"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for preset in args.presets:
        record(preset, args.out)


if __name__ == "__main__":
    main()
