"""bench/llamacpp.py's pure helpers: the bytes one token reads from a GGUF, the medians of runs."""

import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import llamacpp  # noqa: E402


def _write(path: Path, names: list[str]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(3)
    for name in names:
        writer.add_tensor(name, np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_bytes_per_token_leave_out_an_untied_embedding(tmp_path: Path) -> None:
    untied, tied = tmp_path / "untied.gguf", tmp_path / "tied.gguf"
    _write(untied, ["token_embd.weight", "blk.0.attn_q.weight", "output.weight"])
    _write(tied, ["token_embd.weight", "blk.0.attn_q.weight"])
    assert llamacpp.weight_bytes_per_token(untied) == 2 * 4 * 8 * 4
    assert llamacpp.weight_bytes_per_token(tied) == 2 * 4 * 8 * 4


def test_median_table() -> None:
    runs = [{"decode": 3.0, "prefill": 10.0}, {"decode": 1.0, "prefill": 30.0}, {"decode": 2.0, "prefill": 20.0}]
    assert llamacpp.median_table(runs) == {"decode": 2.0, "prefill": 20.0}
