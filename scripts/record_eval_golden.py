"""Records transformers' evaluation losses on the test data, for `tests/test_examples.py`.

Run by hand (not in CI) in an environment with torch and transformers, from the repository root:

    PYTHONPATH=python python scripts/record_eval_golden.py [--presets tiny-llama ...]

For each preset it writes `tests/golden/eval/<preset>.json`: the token ids of
`tests/data/lora/test.jsonl` as the model's tokenizer encodes them (special tokens added), and for
batch sizes 1 and 3 each batch's mean cross entropy over the positions whose target is a real
token (padding labelled -100), with the count of those positions.
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from exo.testing.synth import write_model
from exo.train.dataset import batches, load_texts

DATA = Path("tests/data/lora")
BATCH_SIZES = (1, 3)


@torch.inference_mode()
def batch_loss(model: torch.nn.Module, inputs: np.ndarray, targets: np.ndarray, lengths: np.ndarray) -> float:
    labels = torch.tensor(targets, dtype=torch.long)
    positions = torch.arange(inputs.shape[1])[None, :]
    labels[positions >= torch.tensor(lengths, dtype=torch.long)[:, None] - 1] = -100
    logits = model(torch.tensor(inputs, dtype=torch.long)).logits.float()
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))


def record(preset: str, out_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(preset, Path(tmp) / "f32", dtype="f32", seed=0)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        ids = [tokenizer.encode(text) for text in load_texts(DATA, "test")]
        sequences = [s for s in ids if len(s) >= 2]
        golden = {"preset": preset, "seed": 0, "token_ids": ids, "batches": {}}
        for size in BATCH_SIZES:
            golden["batches"][str(size)] = [
                {"loss": batch_loss(model, b.inputs, b.targets, b.lengths), "positions": b.positions}
                for b in batches(sequences, size)
            ]
        golden["torch_version"] = torch.__version__
        golden["transformers_version"] = transformers.__version__
    (out_dir / f"{preset}.json").write_text(json.dumps(golden, indent=1))
    print(f"{preset}: {len(sequences)} sequences, losses {[b['loss'] for b in golden['batches']['3']]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny-llama", "tiny-qwen3"])
    parser.add_argument("--out", type=Path, default=Path("tests/golden/eval"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for preset in args.presets:
        record(preset, args.out)


if __name__ == "__main__":
    main()
