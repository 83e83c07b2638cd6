"""exo's command line (`python -m exo.main`, `exo`, `xot`): start a node, serve the API and web chat, show the TUI.

Flags and defaults are exo classic's. `run MODEL --prompt TEXT` (or `--run-model`) answers one prompt and exits
(with `--image PATH`, about that image, for a vision model); `--chat-tui` chats in the terminal instead of showing
the topology view.

This module holds the argument parser and `run`/`main`; the node application they start lives in `exo.app`
(see its package docstring). `App`, `CliError`, `choose_engine`, `mlx_available` and `ProgressBroadcastThrottle`
are re-exported here, where earlier versions defined them.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import sys
from collections.abc import Sequence

from exo.app.app import App, default_temperature
from exo.app.cli_error import CliError
from exo.app.engines import ENGINES, choose_engine, mlx_available
from exo.app.progress import ProgressBroadcastThrottle
from exo.settings import DEBUG, DEBUG_DISCOVERY, VERBOSE, configure_logging
from exo.terminal import print_yellow_exo

MODELS_HELP = (
    "MODEL is a registry id, and the id picks the weights as in exo classic: llama-3.2-1b is the 4-bit "
    "mlx-community quantization, llama-3.2-1b-8bit the 8-bit one, ids ending in -bf16 the unquantized model "
    "(GET /v1/models lists the ids this node's engine runs). A Hugging Face repo id (org/name), a GGUF file in one "
    "(org/name/file.gguf), or a local model directory or .gguf file also work. An id this engine cannot load "
    "(another architecture) is an error that names the id and the engine."
)


def positive_int(text: str) -> int:
    """An argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    """exo classic's flags, with its defaults, plus `--chat-tui`."""
    p = argparse.ArgumentParser(
        prog="exo", description="Run an exo node: a peer-to-peer LLM inference cluster.", epilog=MODELS_HELP
    )
    p.add_argument(
        "command",
        nargs="?",
        choices=["run", "eval", "train"],
        help="run: answer --prompt and exit; eval: score --data's test.jsonl; train: fine-tune LoRA adapters on "
        "its train.jsonl",
    )
    p.add_argument("model_name", nargs="?", help="model for the run, eval and train commands (see MODEL below)")
    p.add_argument(
        "--default-model", type=str, default=None, help="model used when a request names none (see MODEL below)"
    )
    p.add_argument("--iters", type=int, default=100, help="training steps, one batch each (train)")
    p.add_argument(
        "--save-every", type=int, default=5, help="save the adapters every N steps (train; 0: only at the end)"
    )
    p.add_argument(
        "--data",
        type=str,
        default="exo/train/data/lora",
        help='directory of train/valid/test.jsonl, one {"text": ...} a line',
    )
    p.add_argument("--batch-size", type=int, default=1, help="sequences per batch (eval, train)")
    p.add_argument("--resume-checkpoint", type=str, default=None, help="adapter directory to start from (train, eval)")
    p.add_argument("--save-checkpoint-dir", type=str, default="checkpoints", help="where train saves adapters")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="optimizer learning rate (train)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="optimizer (train)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="optimizer weight decay (train)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (train)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; updates scale by alpha/rank (train)")
    p.add_argument(
        "--lora-targets", type=str, default="q_proj,v_proj", help="comma-separated projections to adapt (train)"
    )
    p.add_argument("--node-id", type=str, default=None, help="this node's id (default: persisted random id)")
    p.add_argument("--node-host", type=str, default="0.0.0.0", help="gRPC server host")
    p.add_argument("--node-port", type=int, default=None, help="gRPC server port (default: a free port)")
    p.add_argument("--models-seed-dir", type=str, default=None, help="copy models from here instead of downloading")
    p.add_argument("--listen-port", type=int, default=5678, help="UDP discovery listen port")
    p.add_argument("--download-quick-check", action="store_true", help="trust local model files without checking")
    p.add_argument("--max-parallel-downloads", type=int, default=8, help="parallel file downloads")
    p.add_argument("--broadcast-port", type=int, default=5678, help="UDP discovery broadcast port")
    p.add_argument("--discovery-module", choices=["udp", "tailscale", "manual"], default="udp", help="peer discovery")
    p.add_argument("--discovery-timeout", type=int, default=30, help="seconds before a silent peer is dropped")
    p.add_argument("--discovery-config-path", type=str, default=None, help="JSON config for manual discovery")
    p.add_argument("--wait-for-peers", type=int, default=0, help="peers to wait for before starting")
    p.add_argument("--chatgpt-api-port", type=int, default=52415, help="HTTP API port")
    p.add_argument("--chatgpt-api-response-timeout", type=int, default=900, help="API response timeout, seconds")
    p.add_argument("--max-generate-tokens", type=int, default=10000, help="max tokens generated per request")
    p.add_argument(
        "--progress-deadline",
        type=float,
        default=None,
        help="seconds a request may wait on other nodes with no sign of progress before it fails with HTTP 504 "
        "(default: EXO_PROGRESS_DEADLINE, else 60)",
    )
    p.add_argument(
        "--loading-grace",
        type=float,
        default=None,
        help="seconds a peer that may be loading a model (a request just started, it reported download progress) "
        "may not answer before it counts as dead (default: EXO_LOADING_GRACE, else 120)",
    )
    p.add_argument(
        "--api-key",
        type=str,
        default=os.environ.get("EXO_API_KEY") or None,
        help="the HTTP API answers only requests with `Authorization: Bearer KEY` (default: EXO_API_KEY)",
    )
    p.add_argument(
        "--cluster-key",
        type=str,
        default=os.environ.get("EXO_CLUSTER_KEY") or None,
        help="only nodes started with the same key (16+ characters) join this node's cluster: discovery announcements "
        "and gRPC calls prove it, and exo classic peers cannot join (default: EXO_CLUSTER_KEY)",
    )
    p.add_argument(
        "--inference-engine",
        type=str,
        default=None,
        help="candle (the default; or EXO_ENGINE), mlx (macOS build), rkllm (an RKLLAMA server on a Rockchip board, at "
        "RKLLM_SERVER_HOST:RKLLM_SERVER_PORT) or dummy; exo classic's and xotorch's engine "
        "names (tinygrad, torch, pytorch, cpu, and mlx without an MLX build) and class names run candle",
    )
    p.add_argument("--disable-tui", action=argparse.BooleanOptionalAction, help="no Rich topology TUI")
    p.add_argument("--run-model", type=str, help="run this model on --prompt and exit")
    p.add_argument("--prompt", type=str, default="Who are you?", help="prompt for run / --run-model")
    p.add_argument("--image", type=str, default=None, help="an image file the prompt asks about (vision models: LLaVA)")
    p.add_argument(
        "--default-temp", type=float, default=None, help="default sampling temperature (default: TEMPERATURE, else 0.0)"
    )
    p.add_argument("--tailscale-api-key", type=str, default=None, help="Tailscale API key")
    p.add_argument("--tailnet-name", type=str, default=None, help="Tailnet name")
    p.add_argument("--node-id-filter", type=str, default=None, help="comma-separated allowed peer ids")
    p.add_argument("--interface-type-filter", type=str, default=None, help="comma-separated allowed interface types")
    p.add_argument("--system-prompt", type=str, default=None, help="system prompt for the API")
    p.add_argument("--chat-tui", action="store_true", help="chat in the terminal instead of the topology TUI")
    p.add_argument(
        "--device", type=str, default=None, help="where candle computes: auto, cpu, cuda or cuda:N (sets EXO_DEVICE)"
    )
    p.add_argument(
        "--quantize",
        type=str,
        default=None,
        help="quantize safetensors weights as they load: q8_0, q4_0, q4_k, ... or none (sets EXO_QUANTIZE)",
    )
    p.add_argument(
        "--adapter",
        type=str,
        default=None,
        help="a LoRA adapter merged into the weights this node loads: a PEFT directory, or a train checkpoint "
        "(DIR/NNNNNN); each node of a cluster takes its own (sets EXO_ADAPTER)",
    )
    p.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=32,
        help="requests the API runs at once; later ones wait their turn",
    )
    p.add_argument(
        "--max-queued-requests", type=int, default=128, help="requests that may wait; past this the API answers 503"
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="most prompt tokens one batched step runs; long prompts run in chunks (sets EXO_PREFILL_CHUNK, 256)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="most requests' steps candle runs as one batched pass (sets EXO_MAX_BATCH, 64)",
    )
    p.add_argument(
        "--max-kv-cache-gb",
        type=positive_float,
        default=None,
        help="GB all requests' KV caches may hold together on this node (sets EXO_MAX_KV_CACHE_GB; default: a "
        "quarter of the machine's memory)",
    )
    p.add_argument(
        "--max-context",
        type=positive_int,
        default=None,
        help="most tokens (prompt and answer) of one request (sets EXO_MAX_CONTEXT; default: the model's own limit, "
        "cut to what the KV cache budget holds of the model)",
    )
    return p


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard limit (many peers and downloads need many sockets)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (hard, 8192):
        if target == resource.RLIM_INFINITY or target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                return
            except (ValueError, OSError):
                continue


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop where uvloop is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m exo.main`, `exo` and `xot`."""
    args = build_parser().parse_args(argv)
    configure_logging(DEBUG, DEBUG_DISCOVERY, VERBOSE)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if args.device is not None:
        # The engine and the node's device report both read it.
        os.environ["EXO_DEVICE"] = args.device
    if args.quantize is not None:
        os.environ["EXO_QUANTIZE"] = args.quantize
    if args.adapter is not None:
        os.environ["EXO_ADAPTER"] = args.adapter
    if args.prefill_chunk is not None:
        os.environ["EXO_PREFILL_CHUNK"] = str(args.prefill_chunk)
    if args.max_batch is not None:
        os.environ["EXO_MAX_BATCH"] = str(args.max_batch)
    if args.max_kv_cache_gb is not None:
        os.environ["EXO_MAX_KV_CACHE_GB"] = str(args.max_kv_cache_gb)
    if args.max_context is not None:
        os.environ["EXO_MAX_CONTEXT"] = str(args.max_context)
    raise_open_files_limit()
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 4)))
    print_yellow_exo()
    try:
        app = App(args, loop)
        app.build()
        return loop.run_until_complete(app.serve())
    except CliError as e:
        print(f"exo: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nShutdown requested... exiting")
        return 130
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def main() -> None:
    """Runs the CLI and exits the process without Python's finalization: the core's runtime
    threads may still be completing awaitables, and finalizing under them can crash at exit.
    Everything (node, API, discovery) is stopped by then."""
    code = run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = [
    "ENGINES",
    "App",
    "CliError",
    "ProgressBroadcastThrottle",
    "build_parser",
    "choose_engine",
    "default_temperature",
    "main",
    "mlx_available",
    "raise_open_files_limit",
    "run",
]

if __name__ == "__main__":
    main()
