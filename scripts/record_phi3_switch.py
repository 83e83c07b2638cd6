"""Records, from Hugging Face transformers, the logits of tiny-phi3-partial's greedy steps around
LongRoPE's switch from the short to the long factors (its original context is 40 positions; the
golden prompt has 29 tokens, so the switch comes during the greedy run).

Run by hand (not in CI) in an environment with torch and transformers, from the repository root:

    PYTHONPATH=python python scripts/record_phi3_switch.py

It writes `tests/golden/phi3/tiny-phi3-partial-switch.json`: the prompt, the greedy tokens fed
one at a time after it (as `tests/golden/tiny-phi3-partial.json` has them) and the f32 logits
after each token that lands at positions `FIRST..LAST`. transformers picks the factors per
forward pass (long once the pass reaches past the original context) and keeps the keys cached
before the switch as they were; `tests/test_phi3.py` checks the engine does the same.
"""

import json
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from exo.testing.synth import write_model

PRESET = "tiny-phi3-partial"
FIRST, LAST = 36, 46


@torch.inference_mode()
def main() -> None:
    golden = json.loads(Path(f"tests/golden/{PRESET}.json").read_text())
    ids, tokens = golden["prompt_ids"], golden["greedy_tokens"]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(PRESET, Path(tmp) / "f32", dtype="f32", seed=0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        out = model(torch.tensor([ids]), use_cache=True)
        cache, steps = out.past_key_values, {}
        for position, token in enumerate(tokens[:-1], start=len(ids)):
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            if FIRST <= position <= LAST:
                steps[str(position)] = out.logits[0, -1].float().tolist()
    record = {
        "preset": PRESET,
        "prompt_ids": ids,
        "fed_tokens": tokens[:-1],
        "logits_at_position": steps,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    out_dir = Path("tests/golden/phi3")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{PRESET}-switch.json").write_text(json.dumps(record))
    print(f"{PRESET}: logits at positions {FIRST}..{LAST}")


if __name__ == "__main__":
    main()
