"""Side by side with llama.cpp on the same GGUF file: prefill and decode tok/s, TTFT and peak RSS
of the candle engine and of llama.cpp (llama-cpp-python, `pip install .[bench]`), each in its own
process, with the same thread count, and the decode ceiling (memory bandwidth over the bytes of
weights one token reads, summed from the GGUF's tensors).

    python bench/llamacpp.py --gguf FILE.gguf [--threads 2] [--repeat 3]
    python bench/llamacpp.py --preset llama-3.2-1b --quant q4_k_m      # writes the file with exo.testing.synth
    python bench/llamacpp.py --gguf F16.gguf --ours BF16_DIR           # our bf16 safetensors beside llama.cpp's f16

Our engine takes the `.gguf` path as its model id (`--ours` overrides it with a model directory).
Pairs run `--repeat` times in alternating order; the table shows medians.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine import WARM_UP_TOKENS, _memory_bandwidth_gbs, _peak_rss_mb, _prompt, _run_candle


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of GGUF tensor data one decoded token reads: all tensors but `token_embd.weight`,
    unless the file has no `output.weight` (the LM head is then the tied embedding)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    total = sum(tensors.values())
    return total if "output.weight" not in tensors else total - tensors.get("token_embd.weight", 0)


def median_table(runs: list[dict[str, float]]) -> dict[str, float]:
    """The median of each measurement over repeated runs."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _run_llama(path: str, threads: int, prompt: list[int], decode_tokens: int) -> dict[str, float]:
    from llama_cpp import Llama

    n_ctx = len(prompt) + decode_tokens + 16
    llm = Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx,
                n_gpu_layers=0, verbose=False)  # fmt: skip
    vocab = llm.n_vocab()
    prompt = [t % vocab for t in prompt]
    llm.eval(prompt[:WARM_UP_TOKENS])
    llm.reset()
    started = time.perf_counter()
    llm.eval(prompt)
    token = int(llm.scores[llm.n_tokens - 1].argmax())
    prefill_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(decode_tokens):  # greedy, EOS ignored
        llm.eval([token])
        token = int(llm.scores[llm.n_tokens - 1].argmax())
    return {"prefill_s": prefill_s, "decode_s": time.perf_counter() - started}


def _worker(args: argparse.Namespace) -> None:
    prompt = _prompt(args.prompt_tokens)
    if args.worker == "ours":
        timings = asyncio.run(_run_candle(args.model, prompt, args.decode_tokens, "cpu"))
        result = {key: timings[key] for key in ("prefill_s", "decode_s")}
    else:
        result = _run_llama(args.model, args.threads, prompt, args.decode_tokens)
    sys.stdout.write(json.dumps(result | {"peak_rss_mb": _peak_rss_mb()}) + "\n")


def _measure(backend: str, model: str, args: argparse.Namespace) -> dict[str, float] | None:
    env = {**os.environ, "RAYON_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, __file__, "--worker", backend, "--model", model]
    command += ["--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens)]
    command += ["--decode-tokens", str(args.decode_tokens)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(f"{backend} failed:\n{done.stderr[-3000:]}\n")
        return None
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return {"prefill": args.prompt_tokens / r["prefill_s"], "decode": args.decode_tokens / r["decode_s"],
            "ttft_ms": r["prefill_s"] * 1000, "peak_rss_mb": r["peak_rss_mb"]}  # fmt: skip


def _has_llama() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="the GGUF file both systems run")
    parser.add_argument("--preset", default="llama-3.2-1b", help="without --gguf: synthetic preset to write")
    parser.add_argument("--quant", default="q4_k_m", help="without --gguf: GGUF type to write")
    parser.add_argument("--ours", help="model id for our engine instead of the GGUF path (a bf16 model dir)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--worker", choices=["ours", "llama.cpp"])
    parser.add_argument("--model")
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    path = args.gguf
    if path is None:
        path = Path(tempfile.gettempdir()) / "xotorch-bench-models" / f"{args.preset}-{args.quant}.gguf"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            synth = [sys.executable, "-m", "exo.testing.synth", "--preset", args.preset, "--gguf", args.quant]
            subprocess.run([*synth, "--out", str(path)], check=True)
    backends = {"ours": args.ours or str(path)}
    if _has_llama():
        backends["llama.cpp"] = str(path)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in backends}
    bandwidths = []
    for i in range(args.repeat):
        order = list(backends) if i % 2 == 0 else list(reversed(backends))
        bandwidths.append(_memory_bandwidth_gbs())
        for name in order:
            result = _measure(name, backends[name], args)
            if result is not None:
                runs[name].append(result)
    bandwidth = statistics.median(bandwidths)
    ceiling = bandwidth * 1e9 / weight_bytes_per_token(path)
    print(f"\n{path.name}  ({args.threads} threads, median of {args.repeat}; decode ceiling {ceiling:.2f} tok/s"
          f" at {bandwidth:.1f} GB/s)")  # fmt: skip
    print(f"{'system':<12}{'prefill tok/s':>15}{'decode tok/s':>14}{'TTFT ms':>10}{'peak RSS MB':>13}{'/ ceiling':>11}")
    medians = {name: median_table(r) for name, r in runs.items() if r}
    for name, m in medians.items():
        print(f"{name:<12}{m['prefill']:>15.1f}{m['decode']:>14.2f}{m['ttft_ms']:>10.0f}{m['peak_rss_mb']:>13.0f}"
              f"{m['decode'] / ceiling:>11.2f}")  # fmt: skip
    if len(medians) == 2:
        o, ll = medians["ours"], medians["llama.cpp"]
        ratios = f"prefill {o['prefill'] / ll['prefill']:.2f}x, decode {o['decode'] / ll['decode']:.2f}x"
        print(f"ours / llama.cpp: {ratios}")


if __name__ == "__main__":
    main()
