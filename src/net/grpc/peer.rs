//! `GrpcPeer`: one reused HTTP/2 connection to a peer's `NodeService`, a deadline on every call.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tonic::codec::CompressionEncoding;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::key_check::CallSigner;
use super::{max_message_bytes, message_size_hint, state_to_proto, ERROR_KIND_KEY};
use crate::engine::example::{Example, ExampleLoss};
use crate::engine::InferenceState;
use crate::error::{Error, Result};
use crate::net::cluster_key::{ClusterKey, Strangers};
use crate::net::{PeerHandle, PeerIdentity};
use crate::proto;
use crate::proto::node_service_client::NodeServiceClient;
use crate::shard::Shard;
use crate::tensor::WireTensor;
use crate::topology::{DeviceCapabilities, Topology};

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a health check may take before the peer counts as down.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of small calls: results, statuses, topology (classic waits 15 s for results).
const SHORT_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline of prompt and tensor calls, which wait for the peer's layers to run.
const COMPUTE_TIMEOUT: Duration = Duration::from_secs(900);

/// Peers that did not prove the cluster key, each logged once in this process: discovery makes
/// a fresh handle each time it sees a peer it has not admitted, so a handle cannot remember.
static STRANGE_PEERS: Strangers = Strangers::new();

/// A client whose calls carry a proof of the cluster key (when there is one).
type Client = NodeServiceClient<InterceptedService<Channel, CallSigner>>;

/// A peer reached over gRPC at `address` (`host:port`).
pub struct GrpcPeer {
    identity: PeerIdentity,
    capabilities: DeviceCapabilities,
    client: Mutex<Option<Client>>,
    /// Whether `connect()` or a call opened the connection, and `disconnect()` has not closed
    /// it since. A health check alone reuses or opens the connection without connecting the
    /// peer: classic's contract is that a discovered peer is connected only once asked to be.
    connected: AtomicBool,
    /// Whether the last health check's answer carried `XOTORCH_CORE_HEADER`.
    xotorch_core: AtomicBool,
    /// The engine the last health check's answer named (`XOTORCH_ENGINE_HEADER`).
    engine: Mutex<Option<String>>,
    signer: CallSigner,
}

impl GrpcPeer {
    /// A handle for peer `id` at `address`; nothing is opened until the first call.
    pub fn new(id: String, address: String, description: String, capabilities: DeviceCapabilities) -> Self {
        Self {
            identity: PeerIdentity::new(id, address, description),
            capabilities,
            client: Mutex::new(None),
            connected: AtomicBool::new(false),
            xotorch_core: AtomicBool::new(false),
            engine: Mutex::new(None),
            signer: CallSigner::default(),
        }
    }

    /// The same handle, proving `key` on every call and expecting the peer to prove it back
    /// (when given).
    pub fn with_cluster_key(self, key: Option<ClusterKey>) -> Self {
        Self { signer: CallSigner::new(key), ..self }
    }

    fn endpoint(&self) -> Result<Endpoint> {
        let uri = format!("http://{}", self.identity.addr);
        Ok(Endpoint::from_shared(uri)
            .map_err(|e| {
                Error::Peer(format!("{}: invalid address {:?}: {e}", self.identity.id, self.identity.addr))
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true))
    }

    /// The client for a call to the peer, which leaves the peer connected.
    async fn client(&self) -> Result<Client> {
        let client = self.open().await?;
        self.connected.store(true, Ordering::Relaxed);
        Ok(client)
    }

    /// The client on the open connection, opening one first when there is none.
    async fn open(&self) -> Result<Client> {
        if let Some(client) = self.client.lock().expect("client lock poisoned").clone() {
            return Ok(client);
        }
        let channel = tokio::time::timeout(CONNECT_TIMEOUT, self.endpoint()?.connect())
            .await
            .map_err(|_| self.error("connect", "timed out"))?
            .map_err(|e| self.error("connect", e))?;
        let limit = max_message_bytes()?;
        let client = NodeServiceClient::with_interceptor(channel, self.signer.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
            .accept_compressed(CompressionEncoding::Gzip);
        *self.client.lock().expect("client lock poisoned") = Some(client.clone());
        Ok(client)
    }

    /// Times `calls` SendTensor round trips, each carrying `[1, 1, hidden]` f32 hidden states
    /// for a shard the peer rejects (its first layer after its last): what one hop's message
    /// costs on the wire, without the receiver's layers. Fails if the peer cannot be reached.
    pub async fn tensor_round_trips(&self, hidden: usize, calls: usize) -> Result<Vec<Duration>> {
        let largest = max_message_bytes()? / 8;
        if hidden == 0 || calls == 0 || hidden > largest {
            return Err(Error::InvalidArgument(format!(
                "a round-trip probe needs calls > 0 and 0 < hidden size <= {largest} (got {calls} calls of {hidden})"
            )));
        }
        let tensor = WireTensor::new(crate::tensor::DType::F32, vec![1, 1, hidden], vec![0; hidden * 4])?;
        let request = proto::TensorRequest {
            shard: Some(proto::Shard {
                model_id: "hop-probe".into(),
                start_layer: 1,
                end_layer: 0,
                n_layers: 2,
            }),
            tensor: Some(tensor.into_proto()?),
            request_id: Some("hop-probe".into()),
            inference_state: None,
        };
        let mut client = self.client().await?;
        let mut times = Vec::with_capacity(calls);
        for _ in 0..calls {
            let started = std::time::Instant::now();
            match tokio::time::timeout(SHORT_TIMEOUT, client.send_tensor(request.clone())).await {
                Err(_) => return Err(self.error("SendTensor", format!("no answer within {SHORT_TIMEOUT:?}"))),
                Ok(Err(status)) if status.code() != tonic::Code::InvalidArgument => {
                    return Err(self.status_error("SendTensor", &status))
                }
                Ok(_) => times.push(started.elapsed()),
            }
        }
        Ok(times)
    }

    fn error(&self, call: &str, cause: impl std::fmt::Display) -> Error {
        Error::Peer(format!("{call} to {}@{} failed: {cause}", self.identity.id, self.identity.addr))
    }

    /// The error for a call the peer answered with `status`: of the kind the status names when
    /// a xotorch-core peer sent it, else a peer error.
    fn status_error(&self, call: &str, status: &tonic::Status) -> Error {
        match status.metadata().get(ERROR_KIND_KEY).and_then(|kind| kind.to_str().ok()) {
            Some(kind) => Error::from_kind(kind, &format!("{} (on node {})", status.message(), self.id())),
            None => match message_size_hint(status) {
                Some(hint) => self.error(call, format!("{} ({hint})", status.message())),
                None => self.error(call, format!("{} ({:?})", status.message(), status.code())),
            },
        }
    }

    /// A health check on `client` whose answer, with a cluster key, must prove it too. With a
    /// key, a peer that refuses this node's proof or gives none is logged once; without one, a
    /// keyed peer's refusal is a failed check like any other (the keyed side logs it).
    async fn proven_health_check(
        &self,
        client: &mut Client,
    ) -> Result<tonic::Response<proto::HealthCheckResponse>> {
        let (request, proof) = self.signer.health_check(proto::HealthCheckRequest {});
        let refused = match client.health_check(request).await {
            Ok(answer) => match self.signer.check_answer(proof.as_ref(), answer.metadata()) {
                Ok(()) => return Ok(answer),
                Err(rejection) => format!("its answer has {rejection}"),
            },
            Err(status) if status.code() == tonic::Code::Unauthenticated && self.signer.is_keyed() => {
                format!("it refuses this node's calls: {}", status.message())
            }
            Err(status) => return Err(self.status_error("HealthCheck", &status)),
        };
        let refused = format!("not the same cluster key: {refused}");
        let peer = format!("peer {} at {}", self.identity.id, self.identity.addr);
        if STRANGE_PEERS.first_refusal(&peer) {
            log::warn!("ignoring {peer}: {refused} (logged once)");
        }
        Err(self.error("HealthCheck", refused))
    }

    /// Runs one call with a deadline, naming the call and the peer in any error.
    async fn call<T, F>(&self, name: &str, timeout: Duration, call: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(self.error(name, format!("no answer within {timeout:?}"))),
            Ok(Err(status)) => Err(self.status_error(name, &status)),
            Ok(Ok(response)) => Ok(response.into_inner()),
        }
    }
}

#[async_trait]
impl PeerHandle for GrpcPeer {
    fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    fn device_capabilities(&self) -> DeviceCapabilities {
        self.capabilities.clone()
    }

    async fn connect(&self) -> Result<()> {
        self.client().await.map(|_| ())
    }

    /// True when the peer was connected and answers on its connection (a health check):
    /// classic asks gRPC whether the channel is READY, a state tonic does not expose. So a peer
    /// never connected, or whose server stopped, reads as not connected, as it does in classic.
    async fn is_connected(&self) -> bool {
        if !self.connected.load(Ordering::Relaxed) {
            return false;
        }
        let Some(mut client) = self.client.lock().expect("client lock poisoned").clone() else {
            return false;
        };
        let probe = self.proven_health_check(&mut client);
        matches!(tokio::time::timeout(HEALTH_TIMEOUT, probe).await, Ok(Ok(_)))
    }

    async fn disconnect(&self) -> Result<()> {
        self.connected.store(false, Ordering::Relaxed);
        self.client.lock().expect("client lock poisoned").take();
        Ok(())
    }

    async fn health_check(&self) -> bool {
        let check = async {
            let mut client = self.open().await?;
            self.proven_health_check(&mut client).await
        };
        let Ok(Ok(response)) = tokio::time::timeout(HEALTH_TIMEOUT, check).await else { return false };
        let core = response.metadata().contains_key(crate::net::XOTORCH_CORE_HEADER);
        self.xotorch_core.store(core, Ordering::Relaxed);
        let engine = response.metadata().get(crate::net::XOTORCH_ENGINE_HEADER);
        *self.engine.lock().expect("engine lock poisoned") =
            engine.and_then(|name| name.to_str().ok()).map(str::to_string);
        response.into_inner().is_healthy
    }

    /// True when the peer's port takes a TCP connection: an exo classic node whose event loop
    /// is blocked loading weights still does (the kernel accepts for it), a stopped one does not.
    async fn is_reachable(&self) -> bool {
        let connect = tokio::net::TcpStream::connect(self.identity.addr.as_str());
        matches!(tokio::time::timeout(HEALTH_TIMEOUT, connect).await, Ok(Ok(_)))
    }

    fn runs_xotorch_core(&self) -> bool {
        self.xotorch_core.load(Ordering::Relaxed)
    }

    fn engine(&self) -> Option<String> {
        self.engine.lock().expect("engine lock poisoned").clone()
    }

    async fn send_prompt(
        &self,
        shard: &Shard,
        prompt: &str,
        request_id: &str,
        state: Option<InferenceState>,
    ) -> Result<()> {
        let request = proto::PromptRequest {
            shard: Some(shard.clone().into()),
            prompt: prompt.to_string(),
            request_id: Some(request_id.to_string()),
            inference_state: state.map(state_to_proto).transpose()?,
        };
        let mut client = self.client().await?;
        self.call("SendPrompt", COMPUTE_TIMEOUT, client.send_prompt(request)).await.map(|_| ())
    }

    async fn send_tensor(
        &self,
        shard: &Shard,
        tensor: WireTensor,
        request_id: &str,
        state: Option<InferenceState>,
    ) -> Result<()> {
        let request = proto::TensorRequest {
            shard: Some(shard.clone().into()),
            tensor: Some(tensor.into_proto()?),
            request_id: Some(request_id.to_string()),
            inference_state: state.map(state_to_proto).transpose()?,
        };
        let mut client = self.client().await?;
        self.call("SendTensor", COMPUTE_TIMEOUT, client.send_tensor(request)).await.map(|_| ())
    }

    async fn send_example(
        &self,
        shard: &Shard,
        example: Example,
        train: bool,
        request_id: &str,
    ) -> Result<ExampleLoss> {
        let request = proto::ExampleRequest {
            shard: Some(shard.clone().into()),
            example: Some(example.input.into_proto()?),
            target: Some(example.target.into_proto()?),
            length: Some(example.lengths.into_proto()?),
            train,
            request_id: Some(request_id.to_string()),
        };
        let mut client = self.client().await?;
        let reply = self.call("SendExample", COMPUTE_TIMEOUT, client.send_example(request)).await?;
        // Classic answers an empty tensor where it has no gradient.
        let grads = reply.grads.filter(|g| !g.shape.is_empty()).map(WireTensor::from_proto).transpose()?;
        Ok(ExampleLoss { loss: reply.loss, grads })
    }

    async fn send_result(&self, request_id: &str, tokens: &[u32], is_finished: bool) -> Result<()> {
        let result = tokens
            .iter()
            .map(|&t| {
                i32::try_from(t).map_err(|_| Error::InvalidArgument(format!("token id {t} exceeds int32")))
            })
            .collect::<Result<_>>()?;
        let request = proto::SendResultRequest {
            request_id: request_id.to_string(),
            result,
            tensor: None,
            is_finished,
        };
        let mut client = self.client().await?;
        self.call("SendResult", SHORT_TIMEOUT, client.send_result(request)).await.map(|_| ())
    }

    async fn send_opaque_status(&self, request_id: &str, status: &str) -> Result<()> {
        let request =
            proto::SendOpaqueStatusRequest { request_id: request_id.to_string(), status: status.to_string() };
        let mut client = self.client().await?;
        self.call("SendOpaqueStatus", SHORT_TIMEOUT, client.send_opaque_status(request)).await.map(|_| ())
    }

    async fn collect_topology(&self, visited: &BTreeSet<String>, max_depth: i32) -> Result<Topology> {
        let request = proto::CollectTopologyRequest { visited: visited.iter().cloned().collect(), max_depth };
        let mut client = self.client().await?;
        self.call("CollectTopology", SHORT_TIMEOUT, client.collect_topology(request))
            .await
            .map(Topology::from)
    }
}
