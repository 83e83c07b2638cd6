"""Records transformers + PEFT references for LoRA adapters merged at load, for `tests/test_adapter.py`.

Run by hand (not in CI) from the repository root in an environment with torch, transformers and peft,
after `exo train` has written each preset's trained adapter (in the project's own environment; optimizer.safetensors
removed from it, as the tests do not read it):

    python -m exo.testing.synth --preset PRESET --out /tmp/PRESET
    python -m exo.main train /tmp/PRESET --data tests/data/lora --iters 6 --batch-size 2 \\
        --learning-rate 1e-2 --lora-rank 4 --lora-alpha 8 --lora-targets q_proj,v_proj,o_proj,down_proj \\
        --save-every 0 --save-checkpoint-dir tests/golden/adapter/PRESET/trained --disable-tui
    PYTHONPATH=python python scripts/record_adapter_golden.py [--presets tiny-llama tiny-qwen2 ...]

For each preset it writes, under `tests/golden/adapter/<preset>/`:
- `peft/`: an adapter written by PEFT itself (`get_peft_model`, `save_pretrained`) on all seven projections
  with rank 4, alpha 8 and rsLoRA, its A and B set to seeded random values (PEFT starts B at zero, which
  would adapt nothing), without the model card PEFT writes beside them;
- `golden.json`: the chat-templated prompt's token ids and, for `peft/` and for the one `layers-*`
  directory of the trained checkpoint, the f32 logits of `PeftModel.from_pretrained` at the last 3 prompt
  positions and 20 greedy tokens (EOS ignored).
"""

import argparse
import json
import tempfile
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from exo.testing.synth import write_model

OUT = Path("tests/golden/adapter")
MESSAGES = [{"role": "user", "content": "Tell me about the ring"}]
GREEDY_STEPS = 20
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _write_peft_adapter(model_dir: Path, out: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(out)
    (out / "README.md").unlink()  # PEFT's model card template


@torch.inference_mode()
def _reference(model_dir: Path, adapter_dir: Path, ids: list[int]) -> dict:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    out = model(torch.tensor([ids]), use_cache=True)
    last3 = out.logits[0, -3:].float().tolist()
    cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
    greedy = [token]
    for _ in range(GREEDY_STEPS - 1):
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
        greedy.append(token)
    return {"last3": last3, "greedy": greedy}


def record(preset: str) -> None:
    root = OUT / preset
    trained = sorted((root / "trained").glob("*/layers-*"))
    if len(trained) != 1:
        raise SystemExit(f"{root / 'trained'} needs one checkpoint of one layers-* directory; found {trained}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(preset, Path(tmp) / "f32", dtype="f32", seed=0)
        _write_peft_adapter(model_dir, root / "peft")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        golden = {
            "preset": preset,
            "messages": MESSAGES,
            "prompt_ids": ids,
            "adapters": {
                "peft": _reference(model_dir, root / "peft", ids),
                "trained": _reference(model_dir, trained[0], ids),
            },
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "peft_version": peft.__version__,
        }
    (root / "golden.json").write_text(json.dumps(golden))
    print(f"{preset}: {len(ids)} prompt tokens; greedy {golden['adapters']['peft']['greedy'][:8]}...")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny-llama", "tiny-qwen2"])
    for preset in parser.parse_args().presets:
        record(preset)


if __name__ == "__main__":
    main()
