"""Type stubs for `exo._core`, the compiled Rust core of exo (xotorch-core).

As the extension's classes are built: by `__new__`; `@final` where Python cannot subclass them, `@disjoint_base`
where it can. `python -m mypy.stubtest exo._core` (in scripts/check) holds this file to the built extension.
"""

import os
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, Protocol, final

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

__all__ = [
    "CHIP_FLOPS",
    "TFLOPS",
    "UNKNOWN_DEVICE_CAPABILITIES",
    "CandleInferenceEngine",
    "DeviceCapabilities",
    "DeviceFlops",
    "DownloadStatusIterator",
    "DummyInferenceEngine",
    "GRPCPeerHandle",
    "GRPCServer",
    "HfShardDownloader",
    "IncrementalDetokenizer",
    "ManualDiscovery",
    "NativeDiscovery",
    "NativeInferenceEngine",
    "NativeNode",
    "NativePeerHandle",
    "NativeRequestHandler",
    "NetworkTopology",
    "Partition",
    "PeerConfig",
    "PeerConnection",
    "RKLLMInferenceEngine",
    "RingMemoryWeightedPartitioningStrategy",
    "Shard",
    "TailscaleDiscovery",
    "TokenStream",
    "Tokenizer",
    "Topology",
    "UDPDiscovery",
    "__version__",
    "build_base_shard",
    "build_full_shard",
    "delete_model",
    "dequantize",
    "device_capabilities",
    "downloads_dir",
    "exo_home",
    "expert_routes",
    "get_architecture",
    "get_pretty_name",
    "get_repo",
    "get_supported_models",
    "map_partitions_to_shards",
    "mlx_dequantize",
    "mlx_quantized_matmul",
    "model_cards",
    "ndarray_from_wire",
    "ndarray_to_wire",
    "pretty_names",
    "quantize",
    "remove_model_card",
    "reset_model_cards",
    "seed_models",
    "set_model_card",
    "shards_overlap",
    "unavailable_reason",
]

__version__: str

@final
class Shard:
    """Layers `start_layer..=end_layer` of a model with `n_layers` layers (frozen, hashable)."""

    def __new__(cls, model_id: str, start_layer: int, end_layer: int, n_layers: int) -> Shard: ...
    @property
    def model_id(self) -> str: ...
    @property
    def start_layer(self) -> int: ...
    @property
    def end_layer(self) -> int: ...
    @property
    def n_layers(self) -> int: ...
    def is_first_layer(self) -> bool: ...
    def is_last_layer(self) -> bool: ...
    def get_layer_count(self) -> int: ...
    def overlaps(self, other: Shard) -> bool: ...
    def to_dict(self) -> dict[str, Any]: ...
    @staticmethod
    def from_dict(data: dict[str, Any]) -> Shard: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

def shards_overlap(shard1: Shard, shard2: Shard) -> bool: ...
def ndarray_to_wire(array: npt.ArrayLike) -> tuple[bytes, list[int], str]:
    """`(tensor_data, shape, dtype)`: C-ordered little-endian bytes, dims and numpy's dtype name."""

def ndarray_from_wire(tensor_data: bytes, shape: Sequence[int], dtype: str) -> np.ndarray:
    """The array a wire tensor encodes; raises `InvalidTensorError` when the parts disagree."""

def quantize(values: bytes, rows: int, cols: int, ggml_type: str) -> bytes:
    """The GGUF blocks of `ggml_type` (gguf-py's name, any case: `Q4_K`, `bf16`) holding `values`,
    `rows` x `cols` little-endian f32, row after row (candle's quantizers). An unknown type,
    `cols` not a multiple of the type's block or a wrong length raise a `ValueError`."""

def dequantize(data: bytes, rows: int, cols: int, ggml_type: str) -> bytes:
    """The `rows` x `cols` little-endian f32 values that `data`, GGUF blocks of `ggml_type` row
    after row, hold (candle's dequantizers); bad arguments raise a `ValueError`."""

def mlx_dequantize(
    weight: bytes, scales: bytes, biases: bytes, rows: int, cols: int, bits: int, group_size: int, dtype: str
) -> bytes:
    """The `rows` x `cols` little-endian f32 weights of MLX's `mx.quantize` output as the engine
    decodes them: `weight` packed `bits` a weight, `scales` and `biases` one per `group_size`
    weights in `dtype` (`f32`, `f16` or `bf16`); sizes that disagree raise a `ValueError`."""

def mlx_quantized_matmul(
    x: bytes, weight: bytes, scales: bytes, biases: bytes, rows: int, cols: int, bits: int, group_size: int, dtype: str
) -> bytes:
    """`x Wᵀ` by the engine's kernels (`x`: little-endian f32 rows of `cols`; `W` as in
    `mlx_dequantize`): little-endian f32, `rows` values per row of `x`."""

def expert_routes(model_dir: str | os.PathLike[str], tokens: list[int]) -> list[list[list[int]] | None]:
    """Each layer's chosen experts (indices, best first) at every position of `tokens` run as
    one prompt through the whole mixture-of-experts model at `model_dir`; `None` for a dense
    layer."""

@final
class DeviceFlops:
    """Peak throughput in TFLOPS."""

    def __new__(cls, fp32: float, fp16: float, int8: float) -> DeviceFlops: ...
    @property
    def fp32(self) -> float: ...
    @property
    def fp16(self) -> float: ...
    @property
    def int8(self) -> float: ...
    def to_dict(self) -> dict[str, float]: ...
    def __eq__(self, other: object, /) -> bool: ...

class _FlopsMapping(Protocol):
    def __getitem__(self, key: str, /) -> float: ...

@final
class DeviceCapabilities:
    """A node's device: model, chip, memory (MB) and peak throughput."""

    def __new__(cls, model: str, chip: str, memory: int, flops: DeviceFlops | _FlopsMapping) -> DeviceCapabilities: ...
    @property
    def model(self) -> str: ...
    @property
    def chip(self) -> str: ...
    @property
    def memory(self) -> int: ...
    @property
    def flops(self) -> DeviceFlops: ...
    def to_dict(self) -> dict[str, Any]: ...
    def __eq__(self, other: object, /) -> bool: ...

TFLOPS: float
UNKNOWN_DEVICE_CAPABILITIES: DeviceCapabilities
CHIP_FLOPS: dict[str, DeviceFlops]

def device_capabilities() -> Awaitable[DeviceCapabilities]:
    """Detects this machine's CPU, memory and FLOPS estimate off the event loop."""

@final
class PeerConnection:
    """A directed connection between nodes; equal when both ends are equal."""

    def __new__(cls, from_id: str, to_id: str, description: str | None = None) -> PeerConnection: ...
    @property
    def from_id(self) -> str: ...
    @property
    def to_id(self) -> str: ...
    @property
    def description(self) -> str | None: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class Topology:
    """The cluster graph: node capabilities and peer connections."""

    def __new__(cls) -> Topology: ...
    def update_node(self, node_id: str, device_capabilities: DeviceCapabilities) -> None: ...
    def get_node(self, node_id: str) -> DeviceCapabilities | None: ...
    def all_nodes(self) -> list[tuple[str, DeviceCapabilities]]: ...
    def add_edge(self, from_id: str, to_id: str, description: str | None = None) -> None: ...
    def merge(self, peer_node_id: str, other: Topology) -> None: ...
    @property
    def nodes(self) -> dict[str, DeviceCapabilities]: ...
    @property
    def peer_graph(self) -> dict[str, set[PeerConnection]]: ...
    @property
    def active_node_id(self) -> str | None: ...
    @active_node_id.setter
    def active_node_id(self, node_id: str | None) -> None: ...
    def to_json(self) -> dict[str, Any]: ...

@final
class Partition:
    """A node's share `[start, end)` of a model's layers, as fractions of 1."""

    def __new__(cls, node_id: str, start: float, end: float) -> Partition: ...
    @property
    def node_id(self) -> str: ...
    @property
    def start(self) -> float: ...
    @property
    def end(self) -> float: ...
    def __eq__(self, other: object, /) -> bool: ...

@final
class RingMemoryWeightedPartitioningStrategy:
    """exo classic's default strategy: memory-weighted shares around a ring."""

    def __new__(cls) -> RingMemoryWeightedPartitioningStrategy: ...
    def partition(self, topology: Topology) -> list[Partition]: ...

def map_partitions_to_shards(partitions: Sequence[Partition], num_layers: int, model_id: str) -> list[Shard]:
    """Layer ranges for partitions: every layer in exactly one shard, in partition order."""

@disjoint_base
class NativeInferenceEngine:
    """A Rust engine behind exo classic's `InferenceEngine` methods; every method is awaitable."""

    @property
    def shard(self) -> Shard | None: ...
    @property
    def name(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def tokenizer(self) -> Tokenizer | None: ...
    def encode(self, shard: Shard, prompt: str) -> Awaitable[npt.NDArray[np.int64]]: ...
    def decode(self, shard: Shard, tokens: npt.ArrayLike) -> Awaitable[str]: ...
    def sample(
        self, x: npt.ArrayLike, temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None
    ) -> Awaitable[npt.NDArray[np.int64]]: ...
    def infer_tensor(
        self, request_id: str, shard: Shard, input_data: npt.ArrayLike, inference_state: dict[str, Any] | None = None
    ) -> Awaitable[tuple[np.ndarray, dict[str, Any] | None]]: ...
    def infer_prompt(
        self, request_id: str, shard: Shard, prompt: str, inference_state: dict[str, Any] | None = None
    ) -> Awaitable[tuple[np.ndarray, dict[str, Any] | None]]: ...
    def ensure_shard(self, shard: Shard) -> Awaitable[None]: ...
    def finish_request(self, request_id: str) -> Awaitable[None]: ...
    def eos_token_ids(self, shard: Shard) -> Awaitable[list[int]]: ...

@final
class DummyInferenceEngine(NativeInferenceEngine):
    """exo classic's deterministic test engine."""

    def __new__(cls) -> DummyInferenceEngine: ...

@final
class CandleInferenceEngine(NativeInferenceEngine):
    """Decoder models on candle, from Hugging Face safetensors directories or GGUF files;
    weights stay in their stored dtype or blocks. `device` (`auto`, `cpu`, `cuda`, `cuda:N`)
    overrides `EXO_DEVICE`; `quantize` (`q8_0`, `q4_0`, `q4_k`, ... or `none`) overrides
    `EXO_QUANTIZE`, the block type safetensors weights are quantized to as they load.
    Concurrent `infer_tensor` calls run batched: `prefill_chunk` (else `EXO_PREFILL_CHUNK`,
    256) bounds the prompt positions of one pass, `max_batch` (else `EXO_MAX_BATCH`, 64) the
    requests' steps it takes. `max_kv_cache_gb` (else `EXO_MAX_KV_CACHE_GB`, else a quarter of
    memory) bounds all requests' KV caches together; `max_context` (else `EXO_MAX_CONTEXT`,
    else what that budget holds of each model, up to the model's limit) one request's tokens.
    `adapter` (else `EXO_ADAPTER`) is a LoRA adapter merged into the weights of every shard
    loaded: a PEFT directory, or a `train` checkpoint of `layers-*` directories."""

    def __new__(
        cls,
        shard_downloader: Any = None,
        max_context: int | None = None,
        max_kv_cache_gb: float | None = None,
        device: str | None = None,
        quantize: str | None = None,
        prefill_chunk: int | None = None,
        max_batch: int | None = None,
        adapter: str | os.PathLike[str] | None = None,
    ) -> CandleInferenceEngine: ...
    @property
    def limits(self) -> dict[str, Any]: ...
    def cache_usage(self) -> tuple[int, int]: ...
    def configure_training(
        self,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        targets: Sequence[str] = ...,
        optimizer: str = "adamw",
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        adapter: str | os.PathLike[str] | None = None,
        seed: int = 0,
    ) -> None: ...
    def adapter_gradients(self) -> dict[str, npt.NDArray[Any]]: ...
    def save_adapters(self, path: str | os.PathLike[str]) -> Path | None: ...
    def load_checkpoint(self, shard: Shard, path: str | os.PathLike[str]) -> Awaitable[None]: ...
    def save_checkpoint(self, shard: Shard, path: str | os.PathLike[str]) -> Awaitable[None]: ...

@final
class RKLLMInferenceEngine(NativeInferenceEngine):
    """Whole models on a Rockchip NPU through an RKLLAMA server, answered token by token.
    `host`, `port` and `timeout` override `RKLLM_SERVER_HOST`, `RKLLM_SERVER_PORT` and
    `RKLLM_TIMEOUT`."""

    def __new__(
        cls,
        shard_downloader: Any = None,
        host: str | None = None,
        port: int | None = None,
        timeout: float | None = None,
    ) -> RKLLMInferenceEngine: ...
    @property
    def server(self) -> str: ...
    def health_check(self) -> Awaitable[None]: ...

@final
class Tokenizer:
    """A Hugging Face tokenizer with its chat template, special tokens and EOS ids."""

    @staticmethod
    def from_dir(path: str | os.PathLike[str]) -> Tokenizer: ...
    @staticmethod
    def from_gguf(path: str | os.PathLike[str]) -> Tokenizer: ...
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, tokens: npt.ArrayLike, skip_special_tokens: bool = True) -> str: ...
    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        tokenize: bool = False,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str | list[int]: ...
    @property
    def eos_token_id(self) -> int | None: ...
    @property
    def eos_token_ids(self) -> list[int]: ...
    @property
    def bos_token(self) -> str | None: ...
    @property
    def vocab_size(self) -> int: ...

@final
class IncrementalDetokenizer:
    """Streams text from token ids without ever emitting a broken UTF-8 character."""

    def __new__(cls, tokenizer: Tokenizer) -> IncrementalDetokenizer: ...
    def push(self, token: int) -> str: ...
    def finish(self) -> str: ...

@disjoint_base
class NativePeerHandle:
    """A native peer handle; every network method is awaitable and has a deadline."""

    def id(self) -> str: ...
    def addr(self) -> str: ...
    def description(self) -> str: ...
    def device_capabilities(self) -> DeviceCapabilities: ...
    def connect(self) -> Awaitable[None]: ...
    def is_connected(self) -> Awaitable[bool]: ...
    def disconnect(self) -> Awaitable[None]: ...
    def health_check(self) -> Awaitable[bool]: ...
    def send_prompt(
        self, shard: Shard, prompt: str, request_id: str | None = None, inference_state: dict[str, Any] | None = None
    ) -> Awaitable[None]: ...
    def send_tensor(
        self,
        shard: Shard,
        tensor: npt.ArrayLike,
        request_id: str | None = None,
        inference_state: dict[str, Any] | None = None,
    ) -> Awaitable[None]: ...
    def send_example(
        self,
        shard: Shard,
        example: npt.ArrayLike,
        target: npt.ArrayLike,
        length: npt.ArrayLike,
        train: bool = False,
        request_id: str | None = None,
    ) -> Awaitable[float | tuple[float, npt.NDArray[Any]]]:
        """Runs an example on the peer's shard and the ring after it: the loss, with the input gradient if any."""
    def send_result(self, request_id: str, result: Sequence[int], is_finished: bool) -> Awaitable[None]: ...
    def send_opaque_status(self, request_id: str, status: str) -> Awaitable[None]: ...
    def collect_topology(self, visited: set[str], max_depth: int = 4) -> Awaitable[Topology]: ...

@final
class GRPCPeerHandle(NativePeerHandle):
    """exo classic's gRPC peer: one reused connection to `address` (`host:port`). With a `cluster_key`, every
    call proves it, and a peer whose health check does not prove it back counts as unhealthy."""

    def __new__(
        cls,
        _id: str,
        address: str,
        desc: str,
        device_capabilities: DeviceCapabilities,
        cluster_key: str | None = None,
    ) -> GRPCPeerHandle: ...
    def measure_round_trip(self, hidden_size: int, calls: int = 200) -> Awaitable[float]: ...

@disjoint_base
class NativeDiscovery:
    """A native discovery; the UDP, manual and Tailscale discoveries derive from it."""

    def start(self) -> Awaitable[None]: ...
    def stop(self) -> Awaitable[None]: ...
    def discover_peers(self, wait_for_peers: int = 0) -> Awaitable[list[NativePeerHandle]]: ...

@disjoint_base
class NativeRequestHandler:
    """A native request handler (the base of `NativeNode`): a `GRPCServer` serves it directly."""

@final
class GRPCServer:
    """Serves a node's `NodeService` on `host:port` (port 0 picks a free one); `node` is a `Node`
    or any object with classic's node methods (`process_prompt`, `process_tensor`, ...). With a `cluster_key`, calls
    that do not prove it are refused with UNAUTHENTICATED."""

    def __new__(cls, node: Any, host: str, port: int, cluster_key: str | None = None) -> GRPCServer: ...
    def start(self) -> Awaitable[None]: ...
    def stop(self) -> Awaitable[None]: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...

@final
class TokenStream:
    """A request's token ids as they are generated; `aclose()` cancels the request everywhere."""

    @property
    def request_id(self) -> str: ...
    def __aiter__(self) -> TokenStream: ...
    def __anext__(self) -> Awaitable[int]: ...
    def aclose(self) -> Awaitable[None]: ...

@final
class NativeNode(NativeRequestHandler):
    """The Rust node behind `exo.orchestration.node.Node`: ring, peers, topology, requests."""

    def __new__(
        cls,
        node_id: str,
        inference_engine: Any,
        discovery: Any,
        partitioning_strategy: Any = None,
        max_generate_tokens: int = 1024,
        default_sample_temperature: float = 0.0,
    ) -> NativeNode: ...
    @property
    def id(self) -> str: ...
    def set_server(self, server: Any) -> None: ...
    @property
    def max_generate_tokens(self) -> int: ...
    @max_generate_tokens.setter
    def max_generate_tokens(self, value: int) -> None: ...
    @property
    def default_sample_temperature(self) -> float: ...
    @default_sample_temperature.setter
    def default_sample_temperature(self, value: float) -> None: ...
    @property
    def progress_deadline(self) -> float: ...
    @progress_deadline.setter
    def progress_deadline(self, seconds: float) -> None: ...
    @property
    def loading_grace(self) -> float: ...
    @loading_grace.setter
    def loading_grace(self, seconds: float) -> None: ...
    @property
    def device_capabilities(self) -> DeviceCapabilities: ...
    @device_capabilities.setter
    def device_capabilities(self, capabilities: DeviceCapabilities) -> None: ...
    @property
    def peers(self) -> list[NativePeerHandle]: ...
    @property
    def topology(self) -> Topology: ...
    def engines(self) -> list[str]: ...
    def partitions(self) -> list[Partition]: ...
    @property
    def outstanding_requests(self) -> dict[str, str]: ...
    @property
    def running_requests(self) -> list[dict[str, Any]]: ...
    def start(self, wait_for_peers: int = 0) -> Awaitable[None]: ...
    def stop(self) -> Awaitable[None]: ...
    def get_partition_index(self, offset: int = 0) -> int: ...
    def get_current_shard(self, base_shard: Shard, index: int | None = None) -> Shard: ...
    def layer_plan(self, base_shard: Shard) -> Awaitable[list[tuple[str, int, int, int | None]]]: ...
    def process_prompt(
        self,
        base_shard: Shard,
        prompt: str,
        request_id: str | None = None,
        inference_state: dict[str, Any] | None = None,
    ) -> Awaitable[str]: ...
    def process_tensor(
        self,
        base_shard: Shard,
        tensor: npt.ArrayLike,
        request_id: str | None = None,
        inference_state: dict[str, Any] | None = None,
    ) -> Awaitable[None]: ...
    def enqueue_example(
        self,
        base_shard: Shard,
        example: npt.ArrayLike,
        target: npt.ArrayLike,
        length: npt.ArrayLike,
        train: bool = False,
        request_id: str | None = None,
    ) -> Awaitable[float]:
        """Runs one batch through the ring from the node holding the first layer: its mean loss."""
    def process_example(
        self,
        shard: Shard,
        example: npt.ArrayLike,
        target: npt.ArrayLike,
        length: npt.ArrayLike,
        train: bool = False,
        request_id: str | None = None,
    ) -> Awaitable[float | tuple[float, npt.NDArray[Any]]]:
        """Runs this node's shard over an example, then the ring after it: the loss (and input gradient)."""
    def generate(
        self,
        base_shard: Shard,
        prompt: str,
        request_id: str | None = None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        images: npt.NDArray[Any] | None = None,
    ) -> TokenStream:
        """Starts a request; `images` are the prompt's preprocessed images (`[n, channels, height, width]`)."""
    def cancel_request(self, request_id: str) -> Awaitable[None]: ...
    def update_peers(self, wait_for_peers: int = 0) -> Awaitable[bool]: ...
    def collect_topology(self, visited: set[str], max_depth: int = 4) -> Awaitable[Topology]: ...
    def broadcast_opaque_status(self, request_id: str, status: str) -> Awaitable[None]: ...
    def broadcast_result(self, request_id: str, result: Sequence[int], is_finished: bool) -> Awaitable[None]: ...
    def next_events(self) -> Awaitable[list[tuple[Any, ...]]]:
        """The next queued events: `("token", id, tokens, done)`, `("status", id, json)`, `("failed", id, error)`."""

class _CreatePeerHandle(Protocol):
    def __call__(
        self, peer_id: str, address: str, description: str, device_capabilities: DeviceCapabilities, /
    ) -> Any: ...

@final
class UDPDiscovery(NativeDiscovery):
    """UDP broadcast discovery with exo classic's messages; `allowed_interface_types` also limits where it announces.
    With a `cluster_key`, announcements carry a proof of it and only those proving it are heard."""

    def __new__(
        cls,
        node_id: str,
        node_port: int,
        listen_port: int,
        broadcast_port: int,
        create_peer_handle: _CreatePeerHandle,
        broadcast_interval: float = 2.5,
        discovery_timeout: float = 30.0,
        device_capabilities: DeviceCapabilities | None = None,
        allowed_node_ids: list[str] | None = None,
        allowed_interface_types: list[str] | None = None,
        cluster_key: str | None = None,
    ) -> UDPDiscovery: ...
    @property
    def node_id(self) -> str: ...
    @property
    def node_port(self) -> int: ...
    @property
    def listen_port(self) -> int: ...
    @property
    def broadcast_port(self) -> int: ...
    @property
    def broadcast_interval(self) -> float: ...
    @property
    def discovery_timeout(self) -> float: ...
    @property
    def allowed_node_ids(self) -> list[str] | None: ...
    @property
    def allowed_interface_types(self) -> list[str] | None: ...
    @property
    def device_capabilities(self) -> DeviceCapabilities: ...

@final
class ManualDiscovery(NativeDiscovery):
    """Peers from a JSON network config, re-read when it changes; `start` raises for a missing or invalid file."""

    def __new__(
        cls, network_config_path: str | os.PathLike[str], node_id: str, create_peer_handle: _CreatePeerHandle
    ) -> ManualDiscovery: ...
    @property
    def network_config_path(self) -> str: ...
    @property
    def node_id(self) -> str: ...

@final
class TailscaleDiscovery(NativeDiscovery):
    """Peers from Tailscale's devices API and `custom:exo_*` posture attributes."""

    def __new__(
        cls,
        node_id: str,
        node_port: int,
        create_peer_handle: _CreatePeerHandle,
        discovery_interval: float = 5.0,
        discovery_timeout: float = 30.0,
        update_interval: float = 15.0,
        device_capabilities: DeviceCapabilities | None = None,
        tailscale_api_key: str | None = None,
        tailnet: str | None = None,
        allowed_node_ids: list[str] | None = None,
        *,
        api_base: str | None = None,
        device_id: str | None = None,
    ) -> TailscaleDiscovery: ...
    @property
    def node_id(self) -> str: ...
    @property
    def node_port(self) -> int: ...
    @property
    def discovery_interval(self) -> float: ...
    @property
    def discovery_timeout(self) -> float: ...
    @property
    def update_interval(self) -> float: ...
    @property
    def tailnet(self) -> str | None: ...
    @property
    def allowed_node_ids(self) -> list[str] | None: ...

@final
class PeerConfig:
    """One node of a manual network config."""

    def __new__(cls, address: str, port: int, device_capabilities: DeviceCapabilities) -> PeerConfig: ...
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def device_capabilities(self) -> DeviceCapabilities: ...
    def __eq__(self, other: object, /) -> bool: ...

@final
class NetworkTopology:
    """Every node of a manual network config, this node included."""

    def __new__(cls, peers: dict[str, PeerConfig]) -> NetworkTopology: ...
    @staticmethod
    def from_path(path: str | os.PathLike[str]) -> NetworkTopology: ...
    @property
    def peers(self) -> dict[str, PeerConfig]: ...
    def __eq__(self, other: object, /) -> bool: ...

# The model registry (exo.models).
def model_cards() -> dict[str, dict[str, Any]]:
    """`{model_id: {"layers": n, "repo": {engine_class: repo}}}`."""

def pretty_names() -> dict[str, str]:
    """`{model_id: display name}`."""

def set_model_card(model_id: str, layers: int, repos: list[tuple[str, str]], pretty_name: str | None = None) -> None:
    """Adds `model_id` to the table or replaces its card; `InvalidConfigError` names the id and the bad field."""

def remove_model_card(model_id: str) -> bool:
    """Removes `model_id` from the table (a built-in id included); False when it was not there."""

def reset_model_cards() -> None:
    """Drops every edit of the table."""

def get_repo(model_id: str, inference_engine_classname: str) -> str | None: ...
def get_pretty_name(model_id: str) -> str | None: ...
def get_architecture(model_id: str) -> str | None:
    """The `model_type` of a registry model's weights; None for an unknown id or one added at run time."""

def unavailable_reason(model_id: str, inference_engine_classname: str) -> str | None:
    """Why the engine (a name or class name) can load nothing the id names, naming both; None when it can."""

def get_supported_models(supported_inference_engine_lists: list[list[str]] | None = None) -> list[str]: ...
def build_base_shard(model_id: str, inference_engine_classname: str) -> Shard | None: ...
def build_full_shard(model_id: str, inference_engine_classname: str) -> Shard | None: ...

# Shard downloads (exo.download).
@disjoint_base
class HfShardDownloader:
    """Fetches the files of a shard from the Hugging Face hub into EXO_HOME."""

    def __new__(
        cls, max_parallel_downloads: int = 8, exo_home: str | os.PathLike[str] | None = None
    ) -> HfShardDownloader: ...
    @property
    def on_progress(self) -> Any:
        """An `exo.helpers.AsyncCallbackSystem[str, tuple[Shard, RepoProgressEvent]]`."""
    @property
    def exo_home(self) -> Path: ...
    def ensure_shard(self, shard: Shard, inference_engine_name: str) -> Awaitable[Path]: ...
    def ensure_metadata(self, model_id: str) -> Awaitable[Path]: ...
    def model_layers(self, model_id: str, inference_engine_name: str) -> Awaitable[int]: ...
    def get_shard_download_status(self, inference_engine_name: str) -> DownloadStatusIterator: ...
    def delete_model(self, model_id: str, inference_engine_name: str) -> bool: ...

@final
class DownloadStatusIterator:
    """Async iterator of `(path, RepoProgressEvent)`."""

    def __aiter__(self) -> DownloadStatusIterator: ...
    def __anext__(self) -> Awaitable[tuple[Path, Any]]: ...

def exo_home() -> Path: ...
def downloads_dir() -> Path: ...
def seed_models(seed_dir: str | os.PathLike[str], exo_home: str | os.PathLike[str] | None = None) -> list[str]: ...
def delete_model(model_id: str, inference_engine_name: str, exo_home: str | os.PathLike[str] | None = None) -> bool: ...
