"""Training benchmark: tokens/s of LoRA fine-tuning (rank 8 on q_proj and v_proj, AdamW at lr
1e-4, no weight decay, f32) on the synthetic llama-3.2-1b, on one node and on a ring of two
nodes, against PyTorch + PEFT on the same weights, adapter and batches in the same run.

    python bench/train.py [--preset llama-3.2-1b] [--dtype f32] [--threads 2] [--steps 3]
                          [--repeat 3] [--batch-size 1] [--seq-len 128] [--reference-python PATH]

`--dtype` is the checkpoint's (f32, or bf16 as most published checkpoints are); both sides
compute in f32 either way (PyTorch loads the weights as f32).

Every node is its own process (`RAYON_NUM_THREADS=--threads`, not pinned: a ring trains one
batch at a time, so only one node computes at any moment), and the batches start from a driver
node in this process that holds no layers, as in `bench/cluster.py`: each step is
`enqueue_example(train=True)` through the real ring over gRPC, hidden states forward and their
gradients back. PyTorch (`torch.set_num_threads(--threads)`) runs transformers' model with
PEFT's LoRA in its own process, in this interpreter or in `--reference-python` (it needs torch,
transformers, peft and numpy). Both sides start from the same seeded PEFT adapter
(`exo.testing.synth_adapter`, non-zero `B`) and take the same batches: seeded random token ids,
every sequence `--seq-len + 1` tokens long, so every one of `batch * seq-len` positions is
scored. The first step of each run is untimed (it loads the weights); its loss, before any
update, must agree between the backends, so it is printed for each.

Each repeat runs every configuration once, in alternating order, each from a fresh process;
tokens/s is the median over repeats of `--steps` timed steps, and each ratio is the median of
the repeats' own ratios. Peak RSS is each process's high-water mark (a ring's: the sum of its
nodes' marks, each in brackets; they need not fall at the same moment).
"""

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

PRESET = "llama-3.2-1b"
LEARNING_RATE = 1e-4
# First-step losses of the two backends further apart than this are not the same work.
LOSS_TOLERANCE = 1e-3
REFERENCE_MODULES = ("torch", "transformers", "peft")


def _write_batches(path: Path, vocab: int, count: int, batch_size: int, seq_len: int) -> Path:
    """`count` batches of seeded random token ids, `[count, batch, seq_len + 1]` int32, to `path`."""
    rng = np.random.default_rng(0)
    np.save(path, rng.integers(0, vocab, size=(count, batch_size, seq_len + 1), dtype=np.int32))
    return path


def _vm_hwm_mb(pid: int) -> float:
    """A live process's peak resident memory (`VmHWM`)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _run_torch(model_dir: str, adapter_dir: str, tokens: np.ndarray, threads: int) -> dict[str, Any]:
    """Loss and time of each step of transformers + PEFT over `tokens`' batches."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    losses, seconds = [], []
    for batch in torch.from_numpy(tokens).long():
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        seconds.append(time.perf_counter() - started)
    return {"losses": losses, "seconds": seconds}


async def _serve(name: str, ports: dict[str, int], adapter_dir: str) -> None:
    """A ring node that trains the adapter in `adapter_dir`: serves until killed."""
    from cluster import FixedDiscovery, _peer_handles
    from exo.inference.candle import CandleInferenceEngine
    from exo.networking.grpc.grpc_server import GRPCServer
    from exo.orchestration.node import Node

    engine = CandleInferenceEngine()
    engine.configure_training(adapter=adapter_dir, learning_rate=LEARNING_RATE, weight_decay=0.0)
    node = Node(name, None, engine, FixedDiscovery(_peer_handles(ports, name)), None)
    node.server = GRPCServer(node, "127.0.0.1", ports[name])
    await node.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def _spawn_node(name: str, ports: dict[str, int], adapter_dir: Path, threads: int) -> subprocess.Popen:
    peers = ",".join(f"{n}={p}" for n, p in ports.items())
    command = [sys.executable, __file__, "--worker", "node", "--name", name, "--ports", peers]
    command += ["--adapter", str(adapter_dir)]
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError(f"node {name} did not start")
    return process


@contextlib.asynccontextmanager
async def _ring(size: int, adapter_dir: Path, threads: int) -> AsyncIterator[tuple[Any, list[subprocess.Popen]]]:
    """`size` node processes and a driver node here that holds no layers; yields the driver and
    the processes once every node holds layers and all agree on the ring."""
    from cluster import driver_over
    from exo.helpers import find_available_port

    names = [f"n{i}" for i in range(size)]
    ports = {name: find_available_port("127.0.0.1") for name in [*names, "driver"]}
    processes = [_spawn_node(name, ports, adapter_dir, threads) for name in names]
    async with driver_over(processes, ports) as driver:
        yield driver, processes


async def _run_ours(size: int, model_dir: Path, adapter_dir: Path, tokens: np.ndarray, threads: int) -> dict[str, Any]:
    """Loss and time of each step on a ring of `size` nodes, and the nodes' peak RSS."""
    from exo.inference.shard import Shard

    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    base = Shard(str(model_dir), 0, layers - 1, layers)
    losses, seconds = [], []
    async with _ring(size, adapter_dir, threads) as (driver, processes):
        for batch in tokens:
            lengths = np.full(batch.shape[0], batch.shape[1], dtype=np.int32)
            started = time.perf_counter()
            losses.append(await driver.enqueue_example(base, batch[:, :-1], batch[:, 1:], lengths, train=True))
            seconds.append(time.perf_counter() - started)
        rss = [_vm_hwm_mb(process.pid) for process in processes]
    return {"losses": losses, "seconds": seconds, "rss_mb": rss}


def _measure_torch(model_dir: Path, adapter_dir: Path, batches: Path, args: argparse.Namespace) -> dict[str, Any]:
    python = args.reference_python or sys.executable
    command = [python, __file__, "--worker", "torch", "--model-dir", str(model_dir), "--adapter", str(adapter_dir)]
    command += ["--batches", str(batches), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the PyTorch run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _torch_available(args: argparse.Namespace) -> bool:
    """Whether the reference interpreter imports torch, transformers and peft; says what is missing if not."""
    if args.reference_python:
        probe = f"import importlib.util as u; print(','.join(m for m in {REFERENCE_MODULES} if not u.find_spec(m)))"
        try:
            done = subprocess.run([args.reference_python, "-c", probe], capture_output=True, text=True, check=False)
            missing = done.stdout.strip() if done.returncode == 0 else "a working interpreter"
        except OSError:
            missing = "a working interpreter"
    else:
        missing = ",".join(m for m in REFERENCE_MODULES if importlib.util.find_spec(m) is None)
    if missing:
        print(
            f"PyTorch reference skipped: {args.reference_python or sys.executable} lacks {missing}"
            " (pip install torch transformers peft, or name an interpreter with --reference-python)"
        )
    return not missing


def _rate(run: dict[str, Any], tokens_per_step: int) -> float:
    """Tokens/s over the timed steps (all but the first)."""
    timed = run["seconds"][1:]
    return tokens_per_step * len(timed) / sum(timed)


def _report(runs: dict[str, list[dict[str, Any] | None]], tokens_per_step: int, args: argparse.Namespace) -> None:
    rates = {name: [_rate(r, tokens_per_step) if r else None for r in rs] for name, rs in runs.items()}
    print(
        f"\n{args.preset} {args.dtype} checkpoint, LoRA rank 8 on q_proj,v_proj, AdamW lr {LEARNING_RATE:g};"
        f" batch {args.batch_size} x {args.seq_len} tokens ({tokens_per_step} a step), {args.threads} threads,"
        f" {args.steps} timed steps, medians of the repeats that ran of {args.repeat}"
    )
    header = f"{'configuration':<16}{'tokens/s':>10}{'step s':>9}{'first step s':>14}{'peak RSS MB':>24}"
    print(header + f"{'first loss':>12}")
    for name, all_runs in runs.items():
        rs = [r for r in all_runs if r]
        if not rs:
            print(f"{name:<16}{'(failed)':>10}")
            continue
        rate = statistics.median(x for x in rates[name] if x)
        rss = f"{statistics.median(sum(r['rss_mb']) for r in rs):.0f}"
        if len(rs[0]["rss_mb"]) > 1:
            nodes = zip(*(r["rss_mb"] for r in rs), strict=True)
            rss += " (" + " + ".join(f"{statistics.median(mb):.0f}" for mb in nodes) + ")"
        print(
            f"{name:<16}{rate:>10.1f}{tokens_per_step / rate:>9.2f}"
            f"{statistics.median(r['seconds'][0] for r in rs):>14.1f}{rss:>24}{rs[0]['losses'][0]:>12.5f}"
        )
    print(
        "tokens/s per repeat: "
        + "; ".join(f"{n} " + ", ".join(f"{x:.1f}" if x else "failed" for x in v) for n, v in rates.items())
    )

    def ratio(a: str, b: str, target: float) -> str:
        pairs = [x / y for x, y in zip(rates[a], rates[b], strict=True) if x and y]
        return f"{statistics.median(pairs):.2f}x (target >= {target}x)" if pairs else "(no repeat ran both)"

    print(f"two nodes / one node: {ratio('ours, 2 nodes', 'ours, 1 node', 0.9)}")
    if "PyTorch + PEFT" in runs:
        print(f"ours (1 node) / PyTorch: {ratio('ours, 1 node', 'PyTorch + PEFT', 1.0)}")
    first_runs = {name: next(r for r in rs if r) for name, rs in runs.items() if any(rs)}
    first = {name: r["losses"][0] for name, r in first_runs.items()}
    if not first:
        return
    spread = max(first.values()) - min(first.values())
    verdict = "the same work" if spread <= LOSS_TOLERANCE else "NOT the same work: check weights and adapter"
    print(
        f"first-step losses differ by at most {spread:.2e} ({verdict}); last-step losses: "
        + ", ".join(f"{n} {r['losses'][-1]:.5f}" for n, r in first_runs.items())
    )


def _bench(args: argparse.Namespace) -> None:
    from exo.errors import ExoError
    from exo.testing.synth import cached, cached_model
    from exo.testing.synth_adapter import write_adapter

    model_dir = cached_model(args.preset, args.models, args.dtype)
    adapter_dir = cached(args.models / f"{args.preset}-{args.dtype}-lora-r8", lambda out: write_adapter(out, model_dir))
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    with_torch = _torch_available(args)
    with tempfile.TemporaryDirectory() as tmp:
        batches = _write_batches(Path(tmp) / "batches.npy", vocab, args.steps + 1, args.batch_size, args.seq_len)
        tokens = np.load(batches)
        setups = {
            "ours, 1 node": lambda: asyncio.run(_run_ours(1, model_dir, adapter_dir, tokens, args.threads)),
            "ours, 2 nodes": lambda: asyncio.run(_run_ours(2, model_dir, adapter_dir, tokens, args.threads)),
        }
        if with_torch:
            setups["PyTorch + PEFT"] = lambda: _measure_torch(model_dir, adapter_dir, batches, args)
        runs: dict[str, list[dict[str, Any] | None]] = {name: [] for name in setups}
        for repeat in range(args.repeat):
            order = list(setups) if repeat % 2 == 0 else list(setups)[::-1]
            for name in order:
                # A run that fails (a node killed for memory, say) leaves a gap, not the whole table.
                try:
                    run = setups[name]()
                except (ExoError, RuntimeError) as e:
                    runs[name].append(None)
                    print(f"repeat {repeat + 1}, {name}: failed: {str(e).splitlines()[0]}", flush=True)
                    continue
                runs[name].append(run)
                losses = f"{run['losses'][0]:.5f} -> {run['losses'][-1]:.5f}"
                rate = _rate(run, args.batch_size * args.seq_len)
                print(f"repeat {repeat + 1}, {name}: {rate:.1f} tokens/s, losses {losses}", flush=True)
    _report(runs, args.batch_size * args.seq_len, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=PRESET, help="synthetic preset (exo.testing.synth)")
    parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="the checkpoint's dtype")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run, after one untimed step")
    parser.add_argument("--repeat", type=int, default=3)
    # Our step peaks near 23 GB on the 1B model at batch 1 (it forms a gradient for every frozen
    # matrix: bench/README.md); batch 2 ran out of a 23 GB machine.
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "xotorch-bench-models")
    parser.add_argument("--reference-python", help="interpreter with torch, transformers and peft for the reference")
    parser.add_argument("--worker", choices=["node", "torch"])
    parser.add_argument("--name")
    parser.add_argument("--ports")
    parser.add_argument("--adapter")
    parser.add_argument("--model-dir")
    parser.add_argument("--batches")
    args = parser.parse_args()
    if args.worker == "node":
        ports = {k: int(v) for k, v in (item.split("=") for item in args.ports.split(","))}
        asyncio.run(_serve(args.name, ports, args.adapter))
    elif args.worker == "torch":
        result = _run_torch(args.model_dir, args.adapter, np.load(args.batches), args.threads)
        result["rss_mb"] = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        _bench(args)


if __name__ == "__main__":
    main()
