//! Networking seams: how a node reaches its peers (`PeerHandle`), finds them (`Discovery`)
//! and serves them (`Server`, handing calls to a `RequestHandler`). gRPC lives in `grpc`; the
//! optional key that keeps strangers out of a cluster in `cluster_key`.

pub mod cluster_key;
pub mod grpc;

pub mod discovery;

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;

use crate::engine::example::{Example, ExampleLoss};
use crate::engine::InferenceState;
use crate::error::{Error, Result};
use crate::shard::Shard;
use crate::tensor::WireTensor;
use crate::topology::{DeviceCapabilities, Topology};

/// Response header of a xotorch-core node's health check, holding its version; classic nodes
/// send none. Peers that send it follow the layer plan a request carries.
pub const XOTORCH_CORE_HEADER: &str = "x-xotorch-core";

/// Response header of a xotorch-core node's health check naming the engine it runs (`candle`,
/// `rkllm`, ...), so that peers place on it only the models and layers it can run.
pub const XOTORCH_ENGINE_HEADER: &str = "x-xotorch-engine";

/// Who a peer is: what exo classic's peer handles take in their constructor and hand back
/// from `id()`, `addr()` and `description()`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerIdentity {
    /// The peer's node id.
    pub id: String,
    /// Where the peer listens (`host:port`).
    pub addr: String,
    /// How the peer was found (an interface type, `MAN`, `tailscale`, ...).
    pub description: String,
}

impl PeerIdentity {
    /// An identity from its three parts.
    pub fn new(id: impl Into<String>, addr: impl Into<String>, description: impl Into<String>) -> Self {
        Self { id: id.into(), addr: addr.into(), description: description.into() }
    }
}

/// A connection to one peer, as exo classic's `PeerHandle`. Every call has a deadline.
#[async_trait]
pub trait PeerHandle: Send + Sync {
    /// Who the peer is (fixed when the handle is made).
    fn identity(&self) -> &PeerIdentity;
    /// The peer's node id.
    fn id(&self) -> String {
        self.identity().id.clone()
    }
    /// Where the peer listens (`host:port`).
    fn addr(&self) -> String {
        self.identity().addr.clone()
    }
    /// How the peer was found (an interface type, `MAN`, `tailscale`, ...).
    fn description(&self) -> String {
        self.identity().description.clone()
    }
    /// The peer's device as it announced it.
    fn device_capabilities(&self) -> DeviceCapabilities;

    /// Opens (or reuses) the connection.
    async fn connect(&self) -> Result<()>;
    /// Whether a connection is open (for gRPC: opened, and the peer answers on it).
    async fn is_connected(&self) -> bool;
    /// Closes the connection; later calls reconnect.
    async fn disconnect(&self) -> Result<()>;
    /// Whether the peer answers its health check in time.
    async fn health_check(&self) -> bool;
    /// Whether the peer's process is still there though it may not answer, as one busy loading
    /// a model is (for gRPC: its port takes connections); false where a handle cannot tell.
    async fn is_reachable(&self) -> bool {
        false
    }
    /// Whether the peer's last health check came from a xotorch-core node.
    fn runs_xotorch_core(&self) -> bool {
        false
    }
    /// The engine the peer's node runs, as its last health check named it; `None` for classic
    /// peers and before the first check.
    fn engine(&self) -> Option<String> {
        None
    }

    /// Hands a prompt to the peer's node (`process_prompt`).
    async fn send_prompt(
        &self,
        shard: &Shard,
        prompt: &str,
        request_id: &str,
        state: Option<InferenceState>,
    ) -> Result<()>;
    /// Hands a tensor (hidden states or a token) to the peer's node (`process_tensor`).
    async fn send_tensor(
        &self,
        shard: &Shard,
        tensor: WireTensor,
        request_id: &str,
        state: Option<InferenceState>,
    ) -> Result<()>;
    /// Runs `example` through the peer's shard `shard` and the rest of the ring after it
    /// (`SendExample`); the batch's loss comes back, with the gradient for `shard`'s input
    /// when training. Peers that cannot take examples say so.
    async fn send_example(
        &self,
        _shard: &Shard,
        _example: Example,
        _train: bool,
        _request_id: &str,
    ) -> Result<ExampleLoss> {
        Err(Error::Peer(format!("peer {} does not take examples", self.id())))
    }
    /// Delivers tokens of a request to the peer's token listeners.
    async fn send_result(&self, request_id: &str, tokens: &[u32], is_finished: bool) -> Result<()>;
    /// Delivers a JSON status string to the peer's status listeners.
    async fn send_opaque_status(&self, request_id: &str, status: &str) -> Result<()>;
    /// The peer's view of the cluster, walking peers not in `visited` up to `max_depth`.
    async fn collect_topology(&self, visited: &BTreeSet<String>, max_depth: i32) -> Result<Topology>;
}

/// Makes a peer handle from what discovery learned: id, address, description, capabilities.
pub type PeerFactory =
    Arc<dyn Fn(String, String, String, DeviceCapabilities) -> Arc<dyn PeerHandle> + Send + Sync>;

/// Finds peers, as exo classic's `Discovery`.
#[async_trait]
pub trait Discovery: Send + Sync {
    /// Starts announcing and listening.
    async fn start(&self) -> Result<()>;
    /// Stops every background task.
    async fn stop(&self) -> Result<()>;
    /// The peers known now, after waiting until at least `wait_for_peers` are known.
    async fn discover_peers(&self, wait_for_peers: usize) -> Result<Vec<Arc<dyn PeerHandle>>>;
}

/// What serves a node to its peers, as exo classic's `Server`.
#[async_trait]
pub trait Server: Send + Sync {
    /// Starts listening.
    async fn start(&self) -> Result<()>;
    /// Stops listening; in-flight calls finish or fail.
    async fn stop(&self) -> Result<()>;
}

/// What a server hands incoming calls to: the node, as its peers see it.
#[async_trait]
pub trait RequestHandler: Send + Sync {
    /// A peer started a request here from a prompt; returns once the local layers ran.
    async fn handle_prompt(
        &self,
        shard: Shard,
        prompt: String,
        request_id: Option<String>,
        state: Option<InferenceState>,
    ) -> Result<()>;
    /// A peer continued a request here; returns once the local layers ran.
    async fn handle_tensor(
        &self,
        shard: Shard,
        tensor: WireTensor,
        request_id: Option<String>,
        state: Option<InferenceState>,
    ) -> Result<()>;
    /// A peer sent an example for this node's shard `shard` and the ring after it; answers
    /// with its loss (and input gradient when training).
    async fn handle_example(
        &self,
        _shard: Shard,
        _example: Example,
        _train: bool,
        _request_id: Option<String>,
    ) -> Result<ExampleLoss> {
        Err(Error::InvalidArgument("this node does not take examples".into()))
    }
    /// Tokens of a request arrived.
    async fn handle_result(&self, request_id: String, tokens: Vec<u32>, is_finished: bool);
    /// A status message arrived.
    async fn handle_opaque_status(&self, request_id: String, status: String);
    /// This node's view of the cluster, walking peers not in `visited`.
    async fn handle_collect_topology(&self, visited: BTreeSet<String>, max_depth: i32) -> Result<Topology>;
    /// The engine this node runs, told to peers with its health checks.
    fn engine_name(&self) -> Option<String> {
        None
    }
}
