"""`exo train` on the command line: LoRA steps lower the validation loss, adapters are saved per
shard in PEFT's layout with the optimizer's state at each `--save-every` and at the end, and
`--resume-checkpoint` starts from them (its validation loss before training is the first run's after)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from exo.testing.synth import write_model
from support.solo_cli import run_solo

DATA = Path(__file__).parent / "data" / "lora"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model("tiny-llama", tmp_path_factory.mktemp("tiny-llama") / "f32", dtype="f32", seed=0)


def _valid(stdout: str, when: str) -> float:
    found = re.search(rf"valid loss {when}: (\S+)", stdout)
    assert found, stdout
    return float(found[1])


def test_train_lowers_the_loss_saves_peft_adapters_and_resumes(model_dir: Path, tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    common = ("--data", str(DATA), "--batch-size", "2", "--learning-rate", "1e-2")
    done = run_solo(
        tmp_path, "train", str(model_dir), *common, "--iters", "12", "--save-every", "6",
        "--save-checkpoint-dir", str(checkpoints),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Training on 8 examples with batch_size 2 for 12 iterations" in done.stdout
    assert re.search(r"train loss \S+ \| \d+ tokens \| \d+ tokens/s", done.stdout), done.stdout
    before, after = _valid(done.stdout, "before"), _valid(done.stdout, "after")
    assert after < before - 0.05, done.stdout
    for step in ("000006", "000012"):
        adapter = checkpoints / step / "layers-0-3"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 8 and config["target_modules"] == ["q_proj", "v_proj"]
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        assert len(tensors) == 4 * 2 * 2
        assert tensors["base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"].shape == (32, 8)
        state = load_file(str(adapter / "optimizer.safetensors"))
        assert state["step"].tolist() == [int(step)]
        assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.exp_avg_sq"].shape == (8, 64)
    resumed = run_solo(
        tmp_path, "train", str(model_dir), *common, "--iters", "1", "--save-every", "0",
        "--save-checkpoint-dir", str(tmp_path / "again"), "--resume-checkpoint", str(checkpoints / "000012"),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert abs(_valid(resumed.stdout, "before") - after) <= 1e-4 * after


def test_an_unknown_lora_target_is_refused(model_dir: Path, tmp_path: Path) -> None:
    done = run_solo(tmp_path, "train", str(model_dir), "--data", str(DATA), "--lora-targets", "qkv")
    assert done.returncode == 2
    assert "unknown LoRA target qkv" in done.stderr


class _SavingEngine:
    def __init__(self) -> None:
        self.saved: list[str] = []

    def save_adapters(self, path: str) -> Path:
        self.saved.append(path)
        return Path(path) / "layers-2-3"


def test_peers_save_their_adapters_when_asked_and_the_sender_does_not_twice(tmp_path: Path) -> None:
    from exo.app.training import on_save_status, save_status

    engine = _SavingEngine()
    status = save_status(tmp_path / "ck", origin="a")
    assert on_save_status(engine, "b", status) == (tmp_path / "ck").resolve() / "layers-2-3"
    assert on_save_status(engine, "a", status) is None
    assert on_save_status(engine, "b", '{"type": "node_status"}') is None
    assert on_save_status(engine, "b", "not json") is None
    assert engine.saved == [str((tmp_path / "ck").resolve())]
