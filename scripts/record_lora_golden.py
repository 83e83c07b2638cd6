"""Records torch + PEFT LoRA gradients on the test data, for `tests/test_lora.py`.

Run by hand (not in CI) in an environment with torch, transformers and peft, from the repository
root:

    PYTHONPATH=python python scripts/record_lora_golden.py [--presets tiny-llama ...]

For each preset it loads the f32 synthetic model with the adapter `exo.testing.synth_adapter`
writes (all four layers' q_proj and v_proj, rank 8, alpha 16), runs the first batch of 3 test
sequences, and writes `tests/golden/lora/<preset>.json`: the length-masked cross entropy, every
adapter tensor's gradient, and the hidden states entering layer 2 with the loss's gradient with
respect to them (what a second shard starting there takes and sends back), and the losses of 20
AdamW steps (lr 1e-3, no weight decay) on that batch.
"""

import argparse
import json
import tempfile
from pathlib import Path

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from exo.testing.synth import write_model
from exo.testing.synth_adapter import write_adapter
from exo.train.dataset import Batch, batches, load_texts, tokenize

DATA = Path("tests/data/lora")
SPLIT_LAYER = 2
ADAMW_LR = 1e-3
ADAMW_STEPS = 20


def _loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    labels = torch.tensor(batch.targets, dtype=torch.long)
    positions = torch.arange(batch.inputs.shape[1])[None, :]
    labels[positions >= torch.tensor(batch.lengths, dtype=torch.long)[:, None] - 1] = -100
    logits = model(input_ids=torch.tensor(batch.inputs, dtype=torch.long)).logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _adamw_curve(model_dir: Path, adapter_dir: Path, batch: Batch) -> list[float]:
    """The loss before each of ADAMW_STEPS AdamW steps on `batch` (weight decay 0)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=ADAMW_LR, weight_decay=0.0)
    losses = []
    for _ in range(ADAMW_STEPS):
        optimizer.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def record(preset: str, out_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(preset, Path(tmp) / "f32", dtype="f32", seed=0)
        adapter_dir = write_adapter(Path(tmp) / "adapter", model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
        batch = next(batches(tokenize(load_texts(DATA, "test"), tokenizer.encode), 3))
        captured = {}

        def keep_input(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            hidden.retain_grad()
            captured["hidden"] = hidden

        layers = model.base_model.model.model.layers
        layers[SPLIT_LAYER].register_forward_pre_hook(keep_input, with_kwargs=True)
        loss = _loss(model, batch)
        loss.backward()
        grads = {
            name.replace(".default", ""): param.grad.tolist()
            for name, param in model.named_parameters()
            if "lora_" in name
        }
        curve = _adamw_curve(model_dir, adapter_dir, batch)
        golden = {
            "preset": preset,
            "adamw": {"learning_rate": ADAMW_LR, "losses": curve},
            "split_layer": SPLIT_LAYER,
            "loss": float(loss.detach()),
            "gradients": grads,
            "hidden": captured["hidden"].detach().tolist(),
            "hidden_grad": captured["hidden"].grad.tolist(),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "peft_version": peft.__version__,
        }
    (out_dir / f"{preset}.json").write_text(json.dumps(golden))
    print(f"{preset}: loss {float(loss):.6f}, {len(grads)} adapter gradients")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny-llama", "tiny-qwen3"])
    parser.add_argument("--out", type=Path, default=Path("tests/golden/lora"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for preset in args.presets:
        record(preset, args.out)


if __name__ == "__main__":
    main()
