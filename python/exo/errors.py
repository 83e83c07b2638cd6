"""Exceptions raised by exo's Rust core; every one derives from `ExoError`."""


class ExoError(Exception):
    """Base class of every error exo's core raises."""


class InvalidTensorError(ExoError, ValueError):
    """A tensor's dtype, shape or bytes are inconsistent or unsupported."""


class InvalidShardError(ExoError, ValueError):
    """A shard's layer range does not fit its model."""


class InvalidArgumentError(ExoError, ValueError):
    """An argument outside what the API accepts."""


class BackendError(ExoError, RuntimeError):
    """A failure inside the tensor library."""


__all__ = ["BackendError", "ExoError", "InvalidArgumentError", "InvalidShardError", "InvalidTensorError"]
