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
    /// A model needs more memory than the cluster's nodes have; the message names the model,
    /// what it needs and what is missing.
    #[error("insufficient memory: {0}")]
    InsufficientMemory(String),
    /// A peer could not be reached, timed out, or answered with an error.
    #[error("peer: {0}")]
    Peer(String),
    /// A request was cancelled, or failed on some node of the ring.
    #[error("request failed: {0}")]
    RequestFailed(String),
    /// A request's next token did not arrive within the progress deadline (a node of the ring
    /// dropped it without a word, as an exo classic node does when forwarding fails).
    #[error("request stalled: {0}")]
    Stalled(String),
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
    /// An inference server an engine relies on (RKLLAMA) is down, timed out, lacks the model,
    /// failed to load it or answered with something unreadable; the message names the server.
    #[error("inference server: {0}")]
    InferenceServer(String),
    /// A failure inside the tensor library.
    #[error("tensor backend: {0}")]
    Backend(#[from] candle_core::Error),
}

impl Error {
    /// The stable name of this error's kind; it travels with a failure across the ring (the
    /// `kind` of a `request_failed` status, a gRPC error's `xot-error-kind` metadata), and
    /// [`Error::from_kind`] rebuilds an error of the same kind from it.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidTensor(_) => "invalid_tensor",
            Error::InvalidShard(_) => "invalid_shard",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::InvalidModel(_) => "invalid_model",
            Error::ContextOverflow(_) => "context_length_exceeded",
            Error::CacheEvicted(_) => "cache_evicted",
            Error::InsufficientMemory(_) => "insufficient_memory",
            Error::Peer(_) => "peer_unavailable",
            Error::RequestFailed(_) => "request_failed",
            Error::Stalled(_) => "request_stalled",
            Error::StandIn(_) => "stand_in",
            Error::ConfigNotFound(_) => "config_not_found",
            Error::InvalidConfig(_) => "invalid_config",
            Error::Discovery(_) => "discovery",
            Error::NotFound(_) => "not_found",
            Error::Unauthorized(_) => "unauthorized",
            Error::Connection(_) => "hub_unreachable",
            Error::Integrity(_) => "integrity",
            Error::Offline(_) => "offline",
            Error::Download(_) => "download",
            Error::InferenceServer(_) => "inference_server",
            Error::Backend(_) => "backend",
        }
    }

    /// An error of the same kind and text (the tensor library's errors cannot be cloned, so a
    /// backend error's copy keeps its text only).
    pub fn duplicate(&self) -> Error {
        Error::from_kind(self.kind(), &self.to_string())
    }

    /// An error of the kind `kind` names (as [`Error::kind`] gives it) that reads `message`,
    /// which may start with the kind's own prefix (an error's text as another node wrote it);
    /// a kind this build does not know (a newer peer's) becomes `RequestFailed`.
    pub fn from_kind(kind: &str, message: &str) -> Error {
        let build: fn(String) -> Error = match kind {
            "invalid_tensor" => Error::InvalidTensor,
            "invalid_shard" => Error::InvalidShard,
            "invalid_argument" => Error::InvalidArgument,
            "invalid_model" => Error::InvalidModel,
            "context_length_exceeded" => Error::ContextOverflow,
            "cache_evicted" => Error::CacheEvicted,
            "insufficient_memory" => Error::InsufficientMemory,
            "peer_unavailable" => Error::Peer,
            "request_stalled" => Error::Stalled,
            "stand_in" => Error::StandIn,
            "config_not_found" => Error::ConfigNotFound,
            "invalid_config" => Error::InvalidConfig,
            "discovery" => Error::Discovery,
            "not_found" => Error::NotFound,
            "unauthorized" => Error::Unauthorized,
            "hub_unreachable" => Error::Connection,
            "integrity" => Error::Integrity,
            "offline" => Error::Offline,
            "download" => Error::Download,
            "inference_server" => Error::InferenceServer,
            "backend" => |message| Error::Backend(candle_core::Error::Msg(message)),
            _ => Error::RequestFailed,
        };
        // The kind's own text with an empty message is its prefix, so it is written once.
        let prefix = build(String::new()).to_string();
        build(message.strip_prefix(prefix.as_str()).unwrap_or(message).to_string())
    }
}

/// Shorthand for results carrying [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    /// One error of every kind.
    fn every_kind() -> Vec<Error> {
        let m = || "m".to_string();
        vec![
            Error::InvalidTensor(m()),
            Error::InvalidShard(m()),
            Error::InvalidArgument(m()),
            Error::InvalidModel(m()),
            Error::ContextOverflow(m()),
            Error::CacheEvicted(m()),
            Error::InsufficientMemory(m()),
            Error::Peer(m()),
            Error::RequestFailed(m()),
            Error::Stalled(m()),
            Error::StandIn(m()),
            Error::ConfigNotFound(m()),
            Error::InvalidConfig(m()),
            Error::Discovery(m()),
            Error::NotFound(m()),
            Error::Unauthorized(m()),
            Error::Connection(m()),
            Error::Integrity(m()),
            Error::Offline(m()),
            Error::Download(m()),
            Error::InferenceServer(m()),
            Error::Backend(candle_core::Error::Msg(m())),
        ]
    }

    #[test]
    fn every_kind_is_rebuilt_from_its_name_and_text() {
        let errors = every_kind();
        let names: std::collections::BTreeSet<_> = errors.iter().map(Error::kind).collect();
        assert_eq!(names.len(), errors.len(), "kind names are distinct");
        for error in errors {
            let rebuilt = Error::from_kind(error.kind(), &error.to_string());
            assert_eq!((rebuilt.kind(), rebuilt.to_string()), (error.kind(), error.to_string()));
            let bare = Error::from_kind(error.kind(), "m");
            assert_eq!(bare.to_string(), error.to_string(), "a message without the prefix gets it");
        }
    }

    #[test]
    fn an_unknown_kind_is_a_failed_request() {
        let error = Error::from_kind("from_a_newer_peer", "it broke");
        assert!(matches!(error, Error::RequestFailed(_)));
        assert_eq!(error.to_string(), "request failed: it broke");
    }
}
