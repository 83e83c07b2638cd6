"""`App`: one node with its API and views, wired the way exo classic's main wires them, and its lifecycle."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Coroutine
from typing import Any

from exo.api import ChatGPTAPI
from exo.api.chat_request import ApiError
from exo.api.model_choice import resolve_model_async
from exo.api.text_stream import TokenText
from exo.app.cli_error import CliError
from exo.app.engines import choose_engine
from exo.app.evaluation import evaluate
from exo.app.limits import announce_limits
from exo.app.preloader import ShardPreloader
from exo.app.progress import ProgressBroadcaster
from exo.app.training import configure_engine, on_save_status, train
from exo.app.tui_feed import TuiFeed
from exo.download.new_shard_download import ensure_exo_home, new_shard_downloader, seed_models
from exo.download.shard_download import NoopShardDownloader
from exo.errors import InferenceServerError, InvalidArgumentError, InvalidModelError
from exo.inference.inference_engine import get_inference_engine
from exo.inference.vision import ImageError, image_from_file
from exo.models import unavailable_reason
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.interfaces import get_all_ip_addresses_and_interfaces
from exo.networking.ports import find_available_port
from exo.node_id import get_or_create_node_id
from exo.orchestration.node import Node
from exo.settings import debug_level, env_seconds, env_temperature
from exo.system import get_system_info
from exo.terminal import terminal_link
from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy

logger = logging.getLogger("exo")


def default_temperature(args: argparse.Namespace) -> float:
    """`--default-temp`, else `TEMPERATURE`, else 0.0 (greedy). Raises `CliError` for a `TEMPERATURE` that is not a
    temperature."""
    if args.default_temp is not None:
        return float(args.default_temp)
    try:
        from_env = env_temperature()
    except ValueError as e:
        raise CliError(str(e)) from e
    return 0.0 if from_env is None else from_env


def seconds_setting(flag: float | None, env_name: str) -> float | None:
    """A duration flag, else its environment variable, else None (the node's default). Raises `CliError` for a value
    that is not a number of seconds above 0."""
    if flag is not None:
        if not 0.0 < flag < float("inf"):
            option = "--" + env_name.removeprefix("EXO_").lower().replace("_", "-")
            raise CliError(f"{option} must be a number of seconds above 0, not {flag}")
        return flag
    try:
        return env_seconds(env_name)
    except ValueError as e:
        raise CliError(str(e)) from e


class App:
    """One node with its API and views, wired the way exo classic's main wires them."""

    def __init__(self, args: argparse.Namespace, loop: asyncio.AbstractEventLoop) -> None:
        self.args = args
        self.loop = loop
        self.stopping = asyncio.Event()
        self.engine_choice = choose_engine(args.inference_engine)
        self.engine_name = self.engine_choice.name
        self.default_temp = default_temperature(args)
        self.progress_deadline = seconds_setting(args.progress_deadline, "EXO_PROGRESS_DEADLINE")
        self.loading_grace = seconds_setting(args.loading_grace, "EXO_LOADING_GRACE")
        self.topology_viz: Any = None
        self.node: Any = None
        self.api: Any = None
        self.shard_downloader: Any = None
        self.engine_classname = ""
        self.engine: Any = None
        self.tui_feed: TuiFeed | None = None
        self._tasks: set[concurrent.futures.Future[Any]] = set()

    # ------------------------------------------------------------------ construction (classic's order)

    def _shard_downloader(self) -> Any:
        if self.engine_name == "dummy":
            return NoopShardDownloader()
        return new_shard_downloader(self.args.max_parallel_downloads)

    def _discovery(self, node_id: str, port: int) -> Any:
        args = self.args

        def peer(peer_id: str, address: str, description: str, caps: Any) -> Any:
            return GRPCPeerHandle(peer_id, address, description, caps, cluster_key=args.cluster_key)

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
            cluster_key=args.cluster_key,
        )

    def _check_models(self) -> None:
        """A model named on the command line that this engine cannot load stops start-up with the reason."""
        args = self.args
        run_model = args.model_name or args.run_model if args.command == "run" or args.run_model else None
        for flag, model_id in (("run", run_model), ("--default-model", args.default_model)):
            reason = unavailable_reason(model_id, self.engine_classname) if model_id else None
            if reason is not None:
                raise CliError(f"{flag}: {reason}")

    def build(self) -> None:
        """Builds the engine, discovery, node, gRPC server, API and (unless disabled) the topology TUI."""
        args = self.args
        print(f"Detected system: {get_system_info()}")
        notice = self.engine_choice.notice()
        if notice is not None:
            print(notice)
        if self.engine_choice.device and not os.environ.get("EXO_DEVICE"):
            os.environ["EXO_DEVICE"] = self.engine_choice.device  # the engine and the device report read it
        self.shard_downloader = self._shard_downloader()
        if args.adapter is not None and self.engine_name != "candle":
            raise CliError(f"--adapter: LoRA adapters merge into the candle engine's weights, not {self.engine_name}'s")
        try:
            engine = get_inference_engine(self.engine_name, self.shard_downloader)
        except InvalidArgumentError as e:  # a device this build or machine lacks, an unknown block type
            raise CliError(str(e)) from e
        except InvalidModelError as e:  # an --adapter that is missing or that cannot merge
            raise CliError(f"--adapter: {e}") from e
        self.engine = engine
        self.engine_classname = type(engine).__name__
        try:
            configure_engine(engine, args)
        except InvalidArgumentError as e:  # an unknown LoRA target, rank 0
            raise CliError(str(e)) from e
        self._check_models()
        device = getattr(engine, "device", "cpu")
        print(f"Using inference engine: {self.engine_classname} ({self.engine_name}) on {device}")
        if args.node_port is None:
            args.node_port = find_available_port(args.node_host)
            logger.info("Using available port: %d", args.node_port)
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
        except InvalidArgumentError as e:  # a cluster key too short to use
            raise CliError(str(e)) from e
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
            default_sample_temperature=self.default_temp,
            topology_viz=self.topology_viz,
        )
        if self.progress_deadline is not None:
            self.node.progress_deadline = self.progress_deadline
        if self.loading_grace is not None:
            self.node.loading_grace = self.loading_grace
        try:
            self.node.server = GRPCServer(self.node, args.node_host, args.node_port, cluster_key=args.cluster_key)
        except InvalidArgumentError as e:  # the same, found here when discovery took no key
            raise CliError(str(e)) from e
        self.api = ChatGPTAPI(
            self.node,
            self.engine_classname,
            response_timeout=args.chatgpt_api_response_timeout,
            on_chat_completion_request=self._on_chat_request,
            default_model=args.default_model,
            system_prompt=args.system_prompt,
            max_concurrent_requests=args.max_concurrent_requests,
            max_queued_requests=args.max_queued_requests,
            api_key=args.api_key,
        )
        self.api.on_quit = self.request_stop
        self._register_callbacks()

    def _wants_topology_tui(self) -> bool:
        args = self.args
        return not (args.disable_tui or args.chat_tui or args.command in ("run", "eval", "train") or args.run_model)

    # ------------------------------------------------------------------ callbacks

    def _schedule(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run `coroutine` on the app's loop; callbacks may fire on any thread."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)

    def _register_callbacks(self) -> None:
        """Wires the TUI feed, the shard preloader and the progress broadcast to the node's callbacks."""
        node = self.node
        engine = node.inference_engine
        node.on_opaque_status.register("save_adapters").on_next(
            lambda _request_id, status: on_save_status(engine, node.id, status)
        )
        if self.topology_viz is not None:
            self.tui_feed = TuiFeed(self.topology_viz, node, self.engine_classname)
            self.tui_feed.register()
        if self.shard_downloader is not None:
            ShardPreloader(node, self.shard_downloader, self.engine_classname, self._schedule).register()
            ProgressBroadcaster(node, self._schedule).register(self.shard_downloader)

    def _on_chat_request(self, request_id: str, chat: Any, prompt: str) -> None:
        if self.tui_feed is not None:
            self.tui_feed.on_chat_request(request_id, chat, prompt)

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
        """Creates the exo home directory and copies `--models-seed-dir` into it."""
        try:
            home = await ensure_exo_home()
            logger.info("exo home directory: %s", home)
        except Exception as e:
            print(f"Error checking exo home directory: {e}")
        seed_dir = self.args.models_seed_dir
        if seed_dir:
            seed_dir = os.path.expanduser(seed_dir)  # noqa: ASYNC240 (no I/O: expands ~ from the environment)
            try:
                await seed_models(seed_dir)
            except Exception as e:
                print(f"Error seeding models: {e}")

    async def check_engine_server(self) -> None:
        """Says whether the server an engine relies on (RKLLAMA for rkllm) answers; the node starts either way, and
        its requests fail with the reason until the server answers."""
        health_check = getattr(self.engine, "health_check", None)
        if health_check is None:
            return
        try:
            await health_check()
        except InferenceServerError as e:
            print(f"Warning: {e}. Requests fail until it answers.")
            return
        print(f"Inference server at {self.engine.server} answers")

    async def serve(self) -> int:
        """Start everything, run the chosen mode, stop everything; the process's exit status."""
        args = self.args
        await self.prepare_home()
        await self.check_engine_server()
        self.install_signal_handlers()
        await self.node.start(wait_for_peers=args.wait_for_peers)
        try:
            if args.command == "run" or args.run_model:
                run = self.run_model(args.model_name or args.run_model, args.prompt, args.image)
                return await self._until_stopped(run)
            if args.command == "eval":
                return await self._until_stopped(evaluate(self, args.model_name, args.data, args.batch_size))
            if args.command == "train":
                return await self._until_stopped(train(self, args.model_name))
            await self.api.run(port=args.chatgpt_api_port)
            self._schedule(announce_limits(self.node))
            if self.tui_feed is not None:
                self._schedule(self.tui_feed.refresh())
            if args.chat_tui:
                from exo.viz.chat_tui import ChatTUI

                tui = ChatTUI(
                    f"http://127.0.0.1:{args.chatgpt_api_port}", model=self.api.default_model, api_key=args.api_key
                )
                return await self._until_stopped(tui.run())
            await self.stopping.wait()
            return 0
        finally:
            await self.shutdown()

    async def _until_stopped(self, work: Coroutine[Any, Any, Any]) -> int:
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
        """Stops the views, the API and the node."""
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

    async def run_model(self, model_name: str | None, prompt: str, image: str | None = None) -> int:
        """`run MODEL --prompt TEXT [--image PATH]`: stream the answer to stdout."""
        if not model_name:
            print("Error: a model name is required with 'run' or --run-model", file=sys.stderr)
            return 2
        try:
            model = await resolve_model_async(model_name, self.engine_classname, self.shard_downloader)
            tokenizer = await self.api.tokenizer_for(model)
            processor = await self.api.image_processor_for(model)
            images = [[image] if image else []]
            templated = self.api.prompt_for(tokenizer, processor, [{"role": "user", "content": prompt}], images)
        except ApiError as e:
            print(f"Error: {e.message}", file=sys.stderr)
            return 2
        extra: dict[str, Any] = {}
        if image is not None:
            if processor is None:
                print(f"Error: {model.model_id} does not take images (--image)", file=sys.stderr)
                return 2
            try:
                extra["images"] = processor.pixel_values([image_from_file(image)])
            except ImageError as e:
                print(f"Error: {e}", file=sys.stderr)
                return 2
        request_id = str(uuid.uuid4())
        print(f"Processing prompt: {prompt}")
        logger.log(debug_level(3), "Prompt of %s: %r", request_id, templated)
        text = TokenText(tokenizer)
        started = time.perf_counter()
        count = 0
        generation = self.node.generate(model.base_shard, templated, request_id, **extra)
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
