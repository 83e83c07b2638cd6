//! The crate's one error type: every fallible API returns `Result<_, Error>`.

/// What went wrong, by kind; the Python layer maps each kind to one exception class.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor's dtype, shape or bytes are inconsistent or unsupported.
    #[error("invalid tensor: {0}")]
    InvalidTensor(String),
    /// A shard's layer range does not fit its model.
    #[error("invalid shard: {0}")]
    InvalidShard(String),
    /// An argument outside what the API accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A model directory, config or checkpoint that cannot be used.
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// A request would run past the model's context.
    #[error("context overflow: {0}")]
    ContextOverflow(String),
    /// A request's KV cache was dropped to stay within the memory budget.
    #[error("cache evicted: {0}")]
    CacheEvicted(String),
    /// A peer could not be reached, timed out, or answered with an error.
    #[error("peer: {0}")]
    Peer(String),
    /// A request was cancelled, or failed on some node of the ring.
    #[error("request failed: {0}")]
    RequestFailed(String),
    /// A Python object standing in for an engine, peer, discovery or server raised an error.
    #[error("Python stand-in: {0}")]
    StandIn(String),
    /// A config file (e.g. manual discovery's network config) that does not exist.
    #[error("Config file not found at {0}")]
    ConfigNotFound(String),
    /// A config file that cannot be read or does not validate; the message names the file.
    #[error("{0}")]
    InvalidConfig(String),
    /// Discovery could not start or reach what it needs (a port, an API).
    #[error("discovery: {0}")]
    Discovery(String),
    /// A model repository or one of its files does not exist on the hub (HTTP 404).
    #[error("not found: {0}")]
    NotFound(String),
    /// The hub refused access (HTTP 401/403): a gated or private repository, or a bad token.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The hub could not be reached (connection refused, DNS, timeouts).
    #[error("connection failed: {0}")]
    Connection(String),
    /// A downloaded file does not have the size or hash the hub announced.
    #[error("integrity check failed: {0}")]
    Integrity(String),
    /// Offline mode (`HF_HUB_OFFLINE=1`) and a needed file is in no local cache.
    #[error("offline: {0}")]
    Offline(String),
    /// Any other download failure: an unexpected HTTP status or answer, a local file error.
    #[error("download failed: {0}")]
    Download(String),
    /// A failure inside the tensor library.
    #[error("tensor backend: {0}")]
    Backend(#[from] candle_core::Error),
}

/// Shorthand for results carrying [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
