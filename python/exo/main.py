"""exo's command line (`python -m exo.main`, `exo`, `xot`): start a node, serve the API and web chat, show the TUI.

Flags and defaults are exo classic's. `run MODEL --prompt TEXT` (or `--run-model`) answers one prompt and exits;
`--chat-tui` chats in the terminal instead of showing the topology view.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import os
import platform
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from exo import _core
from exo.helpers import (
    DEBUG,
    find_available_port,
    get_all_ip_addresses_and_interfaces,
    get_or_create_node_id,
    get_system_info,
    print_yellow_exo,
    terminal_link,
)

logger = logging.getLogger("exo")

ENGINES = ("candle", "mlx", "dummy")
UNSUPPORTED_COMMANDS = {
    "train": "training (LoRA fine-tuning) ran on exo classic's MLX/tinygrad engines; this build has no training",
    "eval": "evaluation on a dataset ran on exo classic's MLX/tinygrad engines; this build has no evaluation",
}
PROGRESS_BROADCAST_INTERVAL_S = 0.2
TOPOLOGY_VIEW_REFRESH_S = 1.0


class CliError(Exception):
    """A problem with the command line or the environment, reported without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    """exo classic's flags, with its defaults, plus `--chat-tui`."""
    p = argparse.ArgumentParser(prog="exo", description="Run an exo node: a peer-to-peer LLM inference cluster.")
    p.add_argument("command", nargs="?", choices=["run", "eval", "train"], help="run: answer --prompt and exit")
    p.add_argument("model_name", nargs="?", help="model for the run command")
    p.add_argument("--default-model", type=str, default=None, help="model used when a request names none")
    p.add_argument("--iters", type=int, default=100, help="training iterations (train is not supported)")
    p.add_argument("--save-every", type=int, default=5, help="save every N iterations (train is not supported)")
    p.add_argument("--data", type=str, default="exo/train/data/lora", help="training data (train is not supported)")
    p.add_argument("--batch-size", type=int, default=1, help="minibatch size (train is not supported)")
    p.add_argument("--resume-checkpoint", type=str, default=None, help="checkpoint (train is not supported)")
    p.add_argument("--save-checkpoint-dir", type=str, default="checkpoints", help="(train is not supported)")
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
    p.add_argument("--inference-engine", type=str, default=None, help="candle (default), mlx (macOS build) or dummy")
    p.add_argument("--disable-tui", action=argparse.BooleanOptionalAction, help="no Rich topology TUI")
    p.add_argument("--run-model", type=str, help="run this model on --prompt and exit")
    p.add_argument("--prompt", type=str, default="Who are you?", help="prompt for run / --run-model")
    p.add_argument("--default-temp", type=float, default=0.0, help="default sampling temperature")
    p.add_argument("--tailscale-api-key", type=str, default=None, help="Tailscale API key")
    p.add_argument("--tailnet-name", type=str, default=None, help="Tailnet name")
    p.add_argument("--node-id-filter", type=str, default=None, help="comma-separated allowed peer ids")
    p.add_argument("--interface-type-filter", type=str, default=None, help="comma-separated allowed interface types")
    p.add_argument("--system-prompt", type=str, default=None, help="system prompt for the API")
    p.add_argument("--chat-tui", action="store_true", help="chat in the terminal instead of the topology TUI")
    return p


def mlx_available() -> bool:
    """Whether this build of `exo._core` includes the MLX engine (macOS builds with the `mlx` feature)."""
    return hasattr(_core, "MlxInferenceEngine")


def choose_engine(requested: str | None, environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """The engine to run: `--inference-engine`, else `EXO_ENGINE`, else mlx on a Mac build with it, else candle."""
    name = (requested or environ.get("EXO_ENGINE") or "").strip().lower()
    if not name:
        return "mlx" if mlx_available() else "candle"
    if name not in ENGINES:
        raise CliError(f"unknown inference engine {name!r}; choose one of: {', '.join(ENGINES)}")
    if name == "mlx" and not mlx_available():
        raise CliError(
            "the mlx engine needs a macOS build of xotorch-core with the `mlx` feature; "
            f"this build ({platform.system()} {platform.machine()}) has candle and dummy"
        )
    return name


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard limit (many peers and downloads need many sockets)."""
    try:
        import resource
    except ImportError:
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


class ProgressBroadcastThrottle:
    """Decides which download progress events are broadcast: at most one per model per 0.2 s (plus changes)."""

    def __init__(self, interval: float = PROGRESS_BROADCAST_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def should_send(self, model_id: str, status: str) -> bool:
        if status == "not_started":
            return False
        now = self.clock()
        with self._lock:
            last = self._last.get(model_id)
            if last is not None:
                sent_at, last_status = last
                if status == last_status == "complete":
                    return False
                if status == last_status and now - sent_at < self.interval:
                    return False
            self._last[model_id] = (now, status)
            return True


def _planned_shard(layers: Any, base: Any, node_id: str) -> Any:
    """This node's shard of `base`'s model in a request's layer plan (a list of `node_id`,
    `start_layer`, `end_layer` entries, as xotorch-core nodes announce it), or None."""
    from exo.inference.shard import Shard

    for entry in layers or []:
        if entry.get("node_id") == node_id:
            return Shard(base.model_id, int(entry["start_layer"]), int(entry["end_layer"]), base.n_layers)
    return None


def _status_of(status_json: str) -> dict[str, Any] | None:
    try:
        status = json.loads(status_json)
    except (TypeError, ValueError):
        return None
    return status if isinstance(status, dict) else None


class App:
    """One node with its API and views, wired the way exo classic's main wires them."""

    def __init__(self, args: argparse.Namespace, loop: asyncio.AbstractEventLoop) -> None:
        self.args = args
        self.loop = loop
        self.stopping = asyncio.Event()
        self.engine_name = choose_engine(args.inference_engine)
        self.topology_viz: Any = None
        self.node: Any = None
        self.api: Any = None
        self.shard_downloader: Any = None
        self.engine_classname = ""
        self._throttle = ProgressBroadcastThrottle()
        self._outputs: dict[str, tuple[Any, str]] = {}
        self._preloading: set[Any] = set()
        self._api_requests: set[str] = set()
        self._tasks: set[concurrent.futures.Future[Any]] = set()

    # ------------------------------------------------------------------ construction (classic's order)

    def _shard_downloader(self) -> Any:
        if self.engine_name == "dummy":
            try:
                from exo.download.shard_download import NoopShardDownloader
            except ImportError:
                return None
            return NoopShardDownloader()
        try:
            from exo.download.new_shard_download import new_shard_downloader
        except ImportError:
            logger.warning("Model downloads are not part of this build; only local model directories will run.")
            return None
        return new_shard_downloader(self.args.max_parallel_downloads)

    def _discovery(self, node_id: str, port: int) -> Any:
        from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle

        def peer(peer_id: str, address: str, description: str, caps: Any) -> Any:
            return GRPCPeerHandle(peer_id, address, description, caps)

        args = self.args
        allowed_ids = args.node_id_filter.split(",") if args.node_id_filter else None
        allowed_types = args.interface_type_filter.split(",") if args.interface_type_filter else None
        if args.discovery_module == "manual":
            if not args.discovery_config_path:
                raise CliError("--discovery-config-path is required with --discovery-module manual")
            from exo.networking.manual.manual_discovery import ManualDiscovery

            return ManualDiscovery(args.discovery_config_path, node_id, create_peer_handle=peer)
        if args.discovery_module == "tailscale":
            from exo.networking.tailscale.tailscale_discovery import TailscaleDiscovery

            return TailscaleDiscovery(
                node_id,
                port,
                peer,
                discovery_timeout=args.discovery_timeout,
                tailscale_api_key=args.tailscale_api_key,
                tailnet=args.tailnet_name,
                allowed_node_ids=allowed_ids,
            )
        from exo.networking.udp.udp_discovery import UDPDiscovery

        return UDPDiscovery(
            node_id,
            port,
            args.listen_port,
            args.broadcast_port,
            peer,
            discovery_timeout=args.discovery_timeout,
            allowed_node_ids=allowed_ids,
            allowed_interface_types=allowed_types,
        )

    def build(self) -> None:
        from exo.api import ChatGPTAPI
        from exo.inference.inference_engine import get_inference_engine
        from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy

        try:
            from exo.networking.grpc.grpc_server import GRPCServer
            from exo.orchestration.node import Node
        except ImportError as e:
            raise CliError(f"this build has no node or gRPC server ({e})") from e

        args = self.args
        print(f"Detected system: {get_system_info()}")
        self.shard_downloader = self._shard_downloader()
        engine = get_inference_engine(self.engine_name, self.shard_downloader)
        self.engine_classname = type(engine).__name__
        print(f"Using inference engine: {self.engine_classname} ({self.engine_name})")
        if args.node_port is None:
            args.node_port = find_available_port(args.node_host)
        node_id = args.node_id or get_or_create_node_id()
        addresses = [ip for ip, _ in get_all_ip_addresses_and_interfaces()]
        web_urls = [f"http://{ip}:{args.chatgpt_api_port}" for ip in addresses]
        api_urls = [f"{url}/v1/chat/completions" for url in web_urls]
        print("Chat interface started:")
        for url in web_urls:
            print(f" - {terminal_link(url)}")
        print("ChatGPT API endpoint served at:")
        for url in api_urls:
            print(f" - {terminal_link(url)}")
        try:
            discovery = self._discovery(node_id, args.node_port)
        except ImportError as e:
            raise CliError(f"this build has no {args.discovery_module} discovery ({e})") from e
        if self._wants_topology_tui():
            from exo.viz.topology_viz import TopologyViz

            self.topology_viz = TopologyViz(chatgpt_api_endpoints=api_urls, web_chat_urls=web_urls)
        self.node = Node(
            node_id,
            None,
            engine,
            discovery,
            self.shard_downloader,
            partitioning_strategy=RingMemoryWeightedPartitioningStrategy(),
            max_generate_tokens=args.max_generate_tokens,
            default_sample_temperature=args.default_temp,
            topology_viz=self.topology_viz,
        )
        self.node.server = GRPCServer(self.node, args.node_host, args.node_port)
        self.api = ChatGPTAPI(
            self.node,
            self.engine_classname,
            response_timeout=args.chatgpt_api_response_timeout,
            on_chat_completion_request=self._on_chat_request,
            default_model=args.default_model,
            system_prompt=args.system_prompt,
        )
        self.api.on_quit = self.request_stop
        self._register_callbacks()

    def _wants_topology_tui(self) -> bool:
        args = self.args
        return not (args.disable_tui or args.chat_tui or args.command == "run" or args.run_model)

    # ------------------------------------------------------------------ callbacks

    def _schedule(self, coroutine: Any) -> None:
        """Run `coroutine` on the app's loop; callbacks may fire on any thread."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)

    def _register_callbacks(self) -> None:
        node = self.node
        node.on_token.register("update_topology_viz").on_next(self._on_token)
        node.on_opaque_status.register("update_prompt_viz").on_next(self._on_status_for_viz)
        node.on_opaque_status.register("preemptively_load_shard").on_next(self._preload_shard)
        if self.shard_downloader is not None:
            self.shard_downloader.on_progress.register("broadcast").on_next(self._broadcast_progress)

    def _on_chat_request(self, request_id: str, chat: Any, prompt: str) -> None:
        if self.topology_viz is None:
            return
        users = [m["content"] for m in chat.messages if m.get("role") == "user"]
        self._api_requests.add(request_id)
        self.topology_viz.update_prompt(request_id, users[-1] if users else prompt)
        self._show_model(chat.model)

    def _show_model(self, model_id: str | None) -> None:
        from exo.api.chat_request import ApiError
        from exo.api.model_choice import resolve_model

        if self.topology_viz is None or not model_id:
            return
        try:
            resolved = resolve_model(model_id, self.engine_classname)
        except ApiError:
            return
        self.topology_viz.update_model(resolved.model_id, resolved.n_layers)

    def _on_token(self, request_id: str, tokens: Sequence[int], is_finished: bool) -> None:
        from exo.api.text_stream import TokenText

        viz = self.topology_viz
        if viz is None:
            return
        entry = self._outputs.get(request_id)
        if entry is None:
            tokenizer = getattr(self.node.inference_engine, "tokenizer", None)
            if tokenizer is None:
                return
            entry = (TokenText(tokenizer), "")
        text, output = entry
        output += "".join(text.push(int(t)) for t in tokens)
        if is_finished:
            output += text.finish()
            self._outputs.pop(request_id, None)
            self._api_requests.discard(request_id)
            viz.update_prompt_output(request_id, output)
            viz.finish_request(request_id)
            return
        self._outputs[request_id] = (text, output)
        viz.update_prompt_output(request_id, output)

    def _on_status_for_viz(self, request_id: str, status_json: str) -> None:
        status = _status_of(status_json)
        if self.topology_viz is None or status is None:
            return
        if status.get("type") != "node_status" or status.get("status") != "start_process_prompt":
            return
        if request_id in self._api_requests:
            return  # shown already, as the user wrote it rather than templated
        self.topology_viz.update_prompt(request_id, status.get("prompt", ""))

    def _preload_shard(self, request_id: str, status_json: str) -> None:
        """When a prompt starts elsewhere, start fetching and loading this node's part of the model now."""
        from exo.inference.shard import Shard

        status = _status_of(status_json)
        if status is None or status.get("type") != "node_status" or status.get("status") != "start_process_prompt":
            return
        if status.get("node_id") == self.node.id or self.shard_downloader is None:
            return
        try:
            base = Shard.from_dict(status.get("base_shard") or status.get("shard"))
            current = _planned_shard(status.get("layers"), base, self.node.id)
            if current is None and status.get("layers") is None:
                current = self.node.get_current_shard(base)
        except Exception as e:
            logger.debug("Cannot preload a shard for status %s: %s", status_json, e)
            return
        if current is None or current in self._preloading:
            return
        self._preloading.add(current)
        self._schedule(self._ensure_shard(current))

    async def _ensure_shard(self, shard: Any) -> None:
        try:
            await self.shard_downloader.ensure_shard(shard, self.engine_classname)
        except Exception as e:
            logger.warning("Preloading %s failed: %s", shard, e)
        finally:
            self._preloading.discard(shard)

    def _broadcast_progress(self, shard: Any, event: Any) -> None:
        if not self._throttle.should_send(shard.model_id, event.status):
            return
        message = json.dumps({"type": "download_progress", "node_id": self.node.id, "progress": event.to_dict()})
        self._schedule(self.node.broadcast_opaque_status("", message))

    # ------------------------------------------------------------------ lifecycle

    async def request_stop(self) -> None:
        """Ask the app to shut down (POST /quit)."""
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.loop.add_signal_handler(sig, self.stopping.set)
            except (NotImplementedError, RuntimeError):
                signal.signal(sig, lambda *_: self.loop.call_soon_threadsafe(self.stopping.set))

    async def prepare_home(self) -> None:
        try:
            from exo.download.new_shard_download import ensure_exo_home, seed_models
        except ImportError:
            return
        try:
            home = await ensure_exo_home()
            logger.debug("exo home directory: %s", home)
        except Exception as e:
            print(f"Error checking exo home directory: {e}")
        seed_dir = self.args.models_seed_dir
        if seed_dir:
            seed_dir = os.path.expanduser(seed_dir)  # noqa: ASYNC240 (no I/O: expands ~ from the environment)
            try:
                await seed_models(seed_dir)
            except Exception as e:
                print(f"Error seeding models: {e}")

    async def serve(self) -> int:
        """Start everything, run the chosen mode, stop everything; the process's exit status."""
        args = self.args
        await self.prepare_home()
        self.install_signal_handlers()
        await self.node.start(wait_for_peers=args.wait_for_peers)
        try:
            if args.command == "run" or args.run_model:
                return await self._until_stopped(self.run_model(args.model_name or args.run_model, args.prompt))
            await self.api.run(port=args.chatgpt_api_port)
            if self.topology_viz is not None:
                self._schedule(self._refresh_topology_view())
            if args.chat_tui:
                from exo.viz.chat_tui import ChatTUI

                tui = ChatTUI(f"http://127.0.0.1:{args.chatgpt_api_port}", model=args.default_model)
                return await self._until_stopped(tui.run())
            await self.stopping.wait()
            return 0
        finally:
            await self.shutdown()

    async def _refresh_topology_view(self) -> None:
        """Keeps the TUI's cluster view current between the node's own updates (which come with statuses)."""
        while True:
            try:
                partitions = self.node.partitions() if hasattr(self.node, "partitions") else []
                self.topology_viz.update_visualization(
                    self.node.topology, partitions, self.node.id, self.node.node_download_progress
                )
            except Exception as e:
                logger.debug("Refreshing the topology view failed: %s", e)
            await asyncio.sleep(TOPOLOGY_VIEW_REFRESH_S)

    async def _until_stopped(self, work: Any) -> int:
        """Runs `work` until it finishes or a stop is requested (then 130, as after Ctrl-C)."""
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(self.stopping.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if task not in done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return 130
        result = task.result()
        return result if isinstance(result, int) else 0

    async def shutdown(self) -> None:
        print("\nShutting down...")
        for future in list(self._tasks):
            future.cancel()
        if self.topology_viz is not None:
            self.topology_viz.stop()
        if self.api is not None:
            await self.api.stop()
        if self.node is not None:
            await self.node.stop()
        if self.args.wait_for_peers > 0:
            await asyncio.sleep(1.0)  # let peers see this node leave before the process ends

    async def run_model(self, model_name: str | None, prompt: str) -> int:
        """`run MODEL --prompt TEXT`: stream the answer to stdout."""
        from exo.api.chat_request import ApiError
        from exo.api.model_choice import resolve_model_async
        from exo.api.text_stream import TokenText

        if not model_name:
            print("Error: a model name is required with 'run' or --run-model", file=sys.stderr)
            return 2
        try:
            model = await resolve_model_async(model_name, self.engine_classname, self.shard_downloader)
        except ApiError as e:
            print(f"Error: {e.message}", file=sys.stderr)
            return 2
        tokenizer = await self.api.tokenizer_for(model)
        templated = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        request_id = str(uuid.uuid4())
        print(f"Processing prompt: {prompt}")
        text = TokenText(tokenizer)
        started = time.perf_counter()
        count = 0
        generation = self.node.generate(model.base_shard, templated, request_id)
        eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
        try:
            async for token in generation:
                if int(token) in eos:
                    break
                count += 1
                sys.stdout.write(text.push(int(token)))
                sys.stdout.flush()
            sys.stdout.write(text.finish() + "\n")
        except Exception as e:
            print(f"\nError processing prompt: {e}", file=sys.stderr)
            return 1
        finally:
            await generation.aclose()
        elapsed = time.perf_counter() - started
        print(f"Generated {count} tokens in {elapsed:.2f}s ({count / elapsed if elapsed else 0.0:.1f} tokens/s)")
        return 0


def _configure_logging() -> None:
    level = logging.DEBUG if DEBUG >= 2 else logging.INFO if DEBUG >= 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m exo.main`, `exo` and `xot`."""
    args = build_parser().parse_args(argv)
    _configure_logging()
    if args.command in UNSUPPORTED_COMMANDS:
        print(f"exo: '{args.command}' is not supported: {UNSUPPORTED_COMMANDS[args.command]}.", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
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


if __name__ == "__main__":
    main()
