"""Exceptions raised by exo's Rust core; every one derives from `ExoError`.

A request that fails on another node of the ring raises the class of the error raised there."""


class ExoError(Exception):
    """Base class of every error exo's core raises."""


class InvalidTensorError(ExoError, ValueError):
    """A tensor's dtype, shape or bytes are inconsistent or unsupported."""


class InvalidShardError(ExoError, ValueError):
    """A shard's layer range does not fit its model."""


class InvalidArgumentError(ExoError, ValueError):
    """An argument outside what the API accepts."""


class InvalidModelError(ExoError, ValueError):
    """A model directory, config or checkpoint that cannot be used."""


class ContextOverflowError(ExoError, ValueError):
    """A request would run past the model's context."""


class CacheEvictedError(ExoError, RuntimeError):
    """A request's KV cache was dropped to stay within the memory budget."""


class InsufficientMemoryError(ExoError, RuntimeError):
    """A model needs more memory than the cluster's nodes have; the message says how much is missing."""


class BackendError(ExoError, RuntimeError):
    """A failure inside the tensor library."""


class InferenceServerError(ExoError, RuntimeError):
    """An inference server an engine relies on (RKLLAMA) is down, timed out, lacks the model, failed to load it or
    answered with something unreadable; the message names the server."""


class PeerError(ExoError, ConnectionError):
    """A peer could not be reached, timed out, or answered with an error."""


class RequestFailedError(ExoError, RuntimeError):
    """A request was cancelled, or failed on some node of the ring (e.g. a peer died)."""


class RequestStalledError(ExoError, TimeoutError):
    """A request's next token did not arrive within the node's progress deadline: a node of the ring dropped it
    without a word (an exo classic node does when forwarding fails) or is still busy past the deadline."""


class StandInError(ExoError, RuntimeError):
    """A Python object standing in for an engine, peer, discovery or server raised an error."""


class ConfigNotFoundError(ExoError, FileNotFoundError):
    """A config file (e.g. manual discovery's network config) does not exist."""


class InvalidConfigError(ExoError, ValueError):
    """A config file cannot be read or does not validate; the message names the file."""


class DiscoveryError(ExoError, RuntimeError):
    """Discovery could not start or reach what it needs (a port, an API)."""


class DownloadError(ExoError, OSError):
    """A model download failed: an unexpected answer from the hub or a local file error."""


class ModelNotFoundError(DownloadError, FileNotFoundError):
    """A model repository or one of its files does not exist on the hub (HTTP 404)."""


class UnauthorizedError(DownloadError, PermissionError):
    """The hub refused access (HTTP 401/403): a gated or private repository, or a bad token."""


class HubConnectionError(DownloadError, ConnectionError):
    """The hub could not be reached (connection refused, DNS, timeouts)."""


class IntegrityError(DownloadError):
    """A downloaded file does not have the size or hash the hub announced."""


class OfflineError(DownloadError):
    """Offline mode (`HF_HUB_OFFLINE=1`) and a needed file is in no local cache."""


__all__ = [
    "BackendError",
    "CacheEvictedError",
    "ConfigNotFoundError",
    "ContextOverflowError",
    "DiscoveryError",
    "DownloadError",
    "ExoError",
    "HubConnectionError",
    "InferenceServerError",
    "InsufficientMemoryError",
    "IntegrityError",
    "InvalidArgumentError",
    "InvalidConfigError",
    "InvalidModelError",
    "InvalidShardError",
    "InvalidTensorError",
    "ModelNotFoundError",
    "OfflineError",
    "PeerError",
    "RequestFailedError",
    "RequestStalledError",
    "StandInError",
    "UnauthorizedError",
]
