"""Exceptions raised by exo's Rust core; every one derives from `ExoError`."""


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


class BackendError(ExoError, RuntimeError):
    """A failure inside the tensor library."""


class PeerError(ExoError, ConnectionError):
    """A peer could not be reached, timed out, or answered with an error."""


class RequestFailedError(ExoError, RuntimeError):
    """A request was cancelled, or failed on some node of the ring (e.g. a peer died)."""


class StandInError(ExoError, RuntimeError):
    """A Python object standing in for an engine, peer, discovery or server raised an error."""


__all__ = [
    "BackendError",
    "CacheEvictedError",
    "ContextOverflowError",
    "ExoError",
    "InvalidArgumentError",
    "InvalidModelError",
    "InvalidShardError",
    "InvalidTensorError",
    "PeerError",
    "RequestFailedError",
    "StandInError",
]
