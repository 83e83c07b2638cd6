"""Records golden values from Hugging Face transformers for each tiny synthetic preset.

Run by hand (not in CI) in an environment with torch and transformers, from the repository root:

    PYTHONPATH=python python scripts/record_golden.py [--presets tiny-llama ...]

For each preset it writes `tests/golden/<preset>.json`: the chat-templated prompt's token ids,
f32 logits of the last 3 prompt positions, 40 greedy tokens (EOS ignored), and the last-position
logits of the bf16 checkpoint run in torch bf16; for mixture-of-experts presets, each sparse
layer's chosen experts at every prompt position of the f32 prefill (`expert_routes`, keyed by
layer, best expert first). `tests/test_golden.py` checks the engine
against them.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from exo.testing.synth import PRESETS, write_model

MESSAGES = [{"role": "user", "content": "Who are you? Tell me about the cluster 🙂"}]
GREEDY_STEPS = 40
TINY = [name for name in PRESETS if name.startswith("tiny-")]


def _prompt_ids(model_dir: Path) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@torch.inference_mode()
def _greedy(model: torch.nn.Module, ids: list[int]) -> tuple[list[list[float]], list[int]]:
    out = model(torch.tensor([ids]), use_cache=True)
    last3 = out.logits[0, -3:].float().tolist()
    cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
    generated = [token]
    for _ in range(GREEDY_STEPS - 1):
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
        generated.append(token)
    return last3, generated


@torch.inference_mode()
def _bf16_last_logits(model_dir: Path, ids: list[int]) -> list[float]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16)
    return model(torch.tensor([ids])).logits[0, -1].float().tolist()


@torch.inference_mode()
def _expert_routes(model: torch.nn.Module, ids: list[int]) -> dict[str, list[list[int]]]:
    """Each sparse layer's router's top-k expert indices per prompt position."""
    routes: dict[str, list[list[int]]] = {}
    hooks = []
    for index, layer in enumerate(model.model.layers):
        router = getattr(layer.mlp, "gate", None)
        if router is None or not type(router).__name__.lower().endswith("topkrouter"):
            continue

        def keep(module: torch.nn.Module, args: object, output: tuple, index: int = index) -> None:
            # Best first: DeepSeek-V2's router leaves its top-k unsorted.
            order = output[1].argsort(dim=-1, descending=True, stable=True)
            routes[str(index)] = output[2].gather(-1, order).tolist()

        hooks.append(router.register_forward_hook(keep))
    model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return routes


def record(preset: str, out_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        f32_dir = write_model(preset, Path(tmp) / "f32", dtype="f32", seed=0)
        bf16_dir = write_model(preset, Path(tmp) / "bf16", dtype="bf16", seed=0)
        ids = _prompt_ids(f32_dir)
        model = AutoModelForCausalLM.from_pretrained(f32_dir, torch_dtype=torch.float32)
        last3, generated = _greedy(model, ids)
        routes = _expert_routes(model, ids)
        golden = {
            "preset": preset,
            "seed": 0,
            "messages": MESSAGES,
            "prompt_ids": ids,
            "logits_last3": last3,
            "greedy_tokens": generated,
            "bf16_last_logits": _bf16_last_logits(bf16_dir, ids),
            **({"expert_routes": routes} if routes else {}),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        }
    (out_dir / f"{preset}.json").write_text(json.dumps(golden))
    print(f"{preset}: {len(ids)} prompt tokens, greedy {generated[:8]}...")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=TINY, choices=TINY)
    parser.add_argument("--out", type=Path, default=Path("tests/golden"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for preset in args.presets:
        record(preset, args.out)


if __name__ == "__main__":
    main()
