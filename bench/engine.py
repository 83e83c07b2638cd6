"""Single-node engine benchmark: prefill and decode speed, time to first token and peak RSS of
the candle engine on the synthetic llama-3.2-1b (or other presets: `qwen3-moe-small` for a mixture of
experts), against Hugging Face transformers on the same
checkpoint in the same run when torch and transformers are installed (`pip install .[bench]`).

    python bench/engine.py [--dtype f32 bf16] [--threads 2] [--prompt-tokens 128] [--decode-tokens 128]
                           [--reference-python PATH] [--device cpu|cuda] [--preset llama-3.2-1b ...]

With `--device cuda` both run on the GPU (a CUDA wheel from `scripts/build-cuda`; transformers
with eager attention), and the table adds the GPU memory each backend held after its last
decoded token beyond what was in use before it started (NVML, CUDA context included); no CPU
bandwidth ceiling is printed then.

`--reference-python` names an interpreter that has torch and transformers, when they are not
installed beside exo (the reference worker needs only them and numpy).

Each measurement runs in its own process so peak RSS belongs to one backend alone. Both
backends make an untimed first pass of 8 prompt tokens after loading ("first pass s"), then the
prompt (128 tokens by default) is timed (prefill, TTFT) and the decoded tokens after it.
The decode ceiling is the memory bandwidth (a 512 MB f32 numpy matrix-vector product, best of
5, measured just before and just after the engine's run; the higher counts) over the weight
bytes one token reads (in a mixture of experts: the router and the chosen experts), printed per preset.
"""

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PRESET = "llama-3.2-1b"
# Tokens of the untimed first pass each backend makes before the timed prompt: the engine maps
# its weights lazily, so its first pass also pages them in (transformers reads them at load).
WARM_UP_TOKENS = 8


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompt(prompt_tokens: int) -> list[int]:
    rng = np.random.default_rng(0)
    return rng.integers(1000, 100_000, size=prompt_tokens).tolist()


def _gpu_used_mb() -> float | None:
    """Memory in use on GPU 0, by NVML (nvidia-ml-py), or None without it."""
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / 2**20


async def _run_candle(model: str, prompt: list[int], decode_tokens: int, device: str) -> dict[str, float | None]:
    """Timings of the candle engine on `model` (a model directory or a GGUF file), all its layers."""
    from exo.inference.candle import CandleInferenceEngine
    from exo.models import build_full_shard

    shard = build_full_shard(model, "CandleInferenceEngine")
    if shard is None:
        raise SystemExit(f"{model} is not a local model")
    engine = CandleInferenceEngine()
    started = time.perf_counter()
    await engine.ensure_shard(shard)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    await engine.infer_tensor("warm-up", shard, np.array([prompt[:WARM_UP_TOKENS]], dtype=np.int64))
    warm_up_s = time.perf_counter() - started

    started = time.perf_counter()
    logits, _ = await engine.infer_tensor("bench", shard, np.array([prompt], dtype=np.int64))
    token = await engine.sample(logits)
    prefill_s = time.perf_counter() - started

    started = time.perf_counter()
    for _ in range(decode_tokens):
        logits, _ = await engine.infer_tensor("bench", shard, token.reshape(1, 1))
        token = await engine.sample(logits)
    decode_s = time.perf_counter() - started
    timings = {"load_s": load_s, "warm_up_s": warm_up_s, "prefill_s": prefill_s, "decode_s": decode_s}
    return timings | {"gpu_used_mb": _gpu_used_mb() if device == "cuda" else None}


def _run_transformers(
    model_dir: str, prompt: list[int], decode_tokens: int, dtype: str, device: str
) -> dict[str, float | None]:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    started = now()
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch_dtype, attn_implementation="eager")
    model.to(device).eval()
    load_s = now() - started
    with torch.inference_mode():
        started = now()
        model(torch.tensor([prompt[:WARM_UP_TOKENS]], device=device), use_cache=True)
        warm_up_s = now() - started
        ids = torch.tensor([prompt], device=device)
        started = now()
        out = model(ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        prefill_s = now() - started
        cache = out.past_key_values
        started = now()
        for _ in range(decode_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
        decode_s = now() - started
    timings = {"load_s": load_s, "warm_up_s": warm_up_s, "prefill_s": prefill_s, "decode_s": decode_s}
    return timings | {"gpu_used_mb": _gpu_used_mb() if device == "cuda" else None}


def _worker(args: argparse.Namespace) -> None:
    prompt = _prompt(args.prompt_tokens)
    gpu_before = _gpu_used_mb() if args.device == "cuda" else None
    if args.backend == "candle":
        result = asyncio.run(_run_candle(args.model_dir, prompt, args.decode_tokens, args.device))
    else:
        result = _run_transformers(args.model_dir, prompt, args.decode_tokens, args.dtype[0], args.device)
    result["peak_rss_mb"] = _peak_rss_mb()
    gpu_after = result.pop("gpu_used_mb")
    if gpu_before is not None and gpu_after is not None:
        result["gpu_mb"] = gpu_after - gpu_before
    sys.stdout.write(json.dumps(result) + "\n")


def _measure(backend: str, model_dir: Path, dtype: str, args: argparse.Namespace) -> dict[str, float] | None:
    env = {**os.environ, "RAYON_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    env["EXO_DEVICE"] = args.device
    python = args.reference_python if backend == "transformers" and args.reference_python else sys.executable
    command = [python, __file__, "--worker", backend, "--model-dir", str(model_dir), "--dtype", dtype]
    command += ["--device", args.device]
    command += ["--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(f"{backend} ({dtype}) failed:\n{done.stderr[-3000:]}\n")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_bandwidth_gbs() -> float:
    """Bytes per second of a 512 MB f32 matrix-vector product (numpy's BLAS), best of 5."""
    matrix = np.ones((8192, 16384), dtype=np.float32)
    vector = np.ones(16384, dtype=np.float32)
    best = min(_timed(lambda: matrix @ vector) for _ in range(5))
    return matrix.nbytes / best / 1e9


def _timed(run: object) -> float:
    started = time.perf_counter()
    run()  # type: ignore[operator]
    return time.perf_counter() - started


def _weight_bytes_per_token(model_dir: Path) -> int:
    """Bytes of weights read to decode one token: every layer plus the LM head (embedding rows are negligible);
    in a mixture of experts only the router and the chosen experts of each sparse layer."""
    from exo.testing.synth import expert_tensors

    config = json.loads((model_dir / "config.json").read_text())
    total = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    width = 2 if config["torch_dtype"] != "float32" else 4
    embedding = config["vocab_size"] * config["hidden_size"] * width
    for layer in range(config["num_hidden_layers"]):
        experts = expert_tensors(config, layer)
        if experts is not None:
            per_expert = sum(np.prod(shape) for _, shape in experts[1:4]) * width
            unread = len(experts[1:]) // 3 - config["num_experts_per_tok"]
            total -= unread * int(per_expert)
    return total if config.get("tie_word_embeddings") else total - embedding


def _report(preset: str, dtype: str, model_dir: Path, args: argparse.Namespace) -> None:
    on_gpu = args.device == "cuda"
    # This machine's bandwidth drifts with its neighbours' load, so it is measured right before
    # and right after the engine's run, and the higher of the two sets the ceiling.
    before = 0.0 if on_gpu else _memory_bandwidth_gbs()
    rows = {"candle": _measure("candle", model_dir, dtype, args)}
    after = 0.0 if on_gpu else _memory_bandwidth_gbs()
    rows["transformers"] = _measure("transformers", model_dir, dtype, args)
    bandwidth = max(before, after)
    ceiling = bandwidth * 1e9 / _weight_bytes_per_token(model_dir)
    if on_gpu:
        print(f"\n{preset} {dtype}  (cuda; transformers with eager attention)")
    else:
        print(
            f"\n{preset} {dtype}  ({args.threads} threads; decode ceiling {ceiling:.2f} tok/s at {bandwidth:.1f}"
            f" GB/s, the higher of {before:.1f} and {after:.1f} GB/s just before and after the engine's run)"
        )
    print(f"weights read per decoded token: {_weight_bytes_per_token(model_dir) / 1e6:.1f} MB (active experts only)")
    print(
        f"{'backend':<14}{'prefill tok/s':>15}{'decode tok/s':>14}{'TTFT ms':>10}{'peak RSS MB':>13}"
        f"{'load s':>8}{'first pass s':>14}" + (f"{'GPU MB':>9}" if on_gpu else "")
    )
    speeds = {}
    for backend, r in rows.items():
        if r is None:
            print(f"{backend:<14}{'(not run)':>15}")
            continue
        prefill = args.prompt_tokens / r["prefill_s"]
        decode = args.decode_tokens / r["decode_s"]
        speeds[backend] = (prefill, decode)
        gpu = f"{r['gpu_mb']:>9.0f}" if "gpu_mb" in r else f"{'-':>9}"
        print(
            f"{backend:<14}{prefill:>15.1f}{decode:>14.2f}{r['prefill_s'] * 1000:>10.0f}"
            f"{r['peak_rss_mb']:>13.0f}{r['load_s']:>8.1f}{r['warm_up_s']:>14.2f}" + (gpu if on_gpu else "")
        )
    if "candle" in speeds and not on_gpu:
        print(f"candle decode / ceiling: {speeds['candle'][1] / ceiling:.2f}")
    if len(speeds) == 2:
        (cp, cd), (tp, td) = speeds["candle"], speeds["transformers"]
        print(f"candle / transformers: prefill {cp / tp:.2f}x, decode {cd / td:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["f32", "bf16"], choices=["f32", "bf16", "f16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "xotorch-bench-models")
    parser.add_argument("--reference-python", help="interpreter with torch and transformers for the reference")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", nargs="+", default=[PRESET], help="synthetic presets to run (exo.testing.synth)")
    parser.add_argument("--worker", choices=["candle", "transformers"], dest="backend")
    parser.add_argument("--model-dir")
    args = parser.parse_args()
    if args.backend:
        _worker(args)
        return
    from exo.testing.synth import cached_model

    for preset in args.preset:
        for dtype in args.dtype:
            _report(preset, dtype, cached_model(preset, args.models, dtype), args)


if __name__ == "__main__":
    main()
