//! `GrpcServer`: serves exo classic's `NodeService`, validating every message before the node
//! sees it; a bad message fails its call with a status, never the server.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Mutex, Weak};

use async_trait::async_trait;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::codec::CompressionEncoding;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use super::connections::{bounded_incoming, ConnectionPolicy};
use super::key_check::CallGate;
use super::{max_message_bytes, state_from_proto, ERROR_KIND_KEY};
use crate::engine::example::Example;
use crate::error::{Error, Result};
use crate::net::cluster_key::ClusterKey;
use crate::net::{RequestHandler, Server};
use crate::proto;
use crate::proto::node_service_server::{NodeService, NodeServiceServer};
use crate::shard::Shard;
use crate::tensor::WireTensor;

/// A running server: where it listens, how to stop it.
struct Running {
    address: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// Serves a node's `NodeService` on `host:port` (port 0 picks a free one).
pub struct GrpcServer {
    handler: Weak<dyn RequestHandler>,
    host: String,
    port: u16,
    running: Mutex<Option<Running>>,
    /// Refuses calls without the cluster key, when there is one.
    gate: CallGate,
    /// How connections are bounded; the environment's policy when not set.
    policy: Option<ConnectionPolicy>,
}

impl GrpcServer {
    /// A server that hands calls to `handler`; it holds it weakly so a node can own its server.
    pub fn new(handler: Weak<dyn RequestHandler>, host: impl Into<String>, port: u16) -> Self {
        Self {
            handler,
            host: host.into(),
            port,
            running: Mutex::new(None),
            gate: CallGate::default(),
            policy: None,
        }
    }

    /// The same server, taking only calls that prove `key` (when given).
    pub fn with_cluster_key(self, key: Option<ClusterKey>) -> Self {
        Self { gate: CallGate::new(key), ..self }
    }

    /// The same server, bounding its connections by `policy` instead of the environment's.
    pub fn with_connection_policy(self, policy: ConnectionPolicy) -> Self {
        Self { policy: Some(policy), ..self }
    }

    /// The host it was asked to listen on.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port it listens on once started (the requested one before).
    pub fn port(&self) -> u16 {
        self.running.lock().expect("server lock poisoned").as_ref().map_or(self.port, |r| r.address.port())
    }

    async fn bind(&self) -> Result<tokio::net::TcpListener> {
        let target = format!("{}:{}", self.host, self.port);
        let addresses = tokio::net::lookup_host(&target)
            .await
            .map_err(|e| Error::InvalidArgument(format!("cannot resolve server address {target}: {e}")))?;
        let mut last_error = None;
        for address in addresses {
            match tokio::net::TcpListener::bind(address).await {
                Ok(listener) => return Ok(listener),
                Err(e) => last_error = Some(e),
            }
        }
        Err(Error::InvalidArgument(match last_error {
            Some(e) => format!("cannot listen on {target}: {e}"),
            None => format!("{target} resolves to no address"),
        }))
    }
}

#[async_trait]
impl Server for GrpcServer {
    async fn start(&self) -> Result<()> {
        if self.running.lock().expect("server lock poisoned").is_some() {
            return Ok(());
        }
        let limit = max_message_bytes()?;
        let policy = match &self.policy {
            Some(policy) => policy.clone(),
            None => ConnectionPolicy::from_env()?,
        };
        let listener = self.bind().await?;
        let address = listener.local_addr().map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let service =
            NodeServiceServer::new(Service { handler: self.handler.clone(), gate: self.gate.clone() })
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit);
        let service = InterceptedService::new(service, self.gate.clone());
        let incoming = bounded_incoming(listener, &policy);
        let (shutdown, signal) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(policy.keepalive_interval))
            .http2_keepalive_timeout(Some(policy.keepalive_timeout))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = signal.await;
            });
        let task = tokio::spawn(async move {
            if let Err(e) = server.await {
                log::error!("gRPC server stopped: {e}");
            }
        });
        *self.running.lock().expect("server lock poisoned") = Some(Running { address, shutdown, task });
        Ok(())
    }

    async fn stop(&self) -> Result<()> {
        let running = self.running.lock().expect("server lock poisoned").take();
        if let Some(running) = running {
            let _ = running.shutdown.send(());
            // In-flight calls get a moment to finish; the listener is closed at once.
            if tokio::time::timeout(std::time::Duration::from_secs(2), running.task).await.is_err() {
                log::warn!("gRPC server on {} did not stop within 2 s", running.address);
            }
        }
        Ok(())
    }
}

/// The tonic service: decodes and validates, then delegates to the handler.
pub(crate) struct Service {
    handler: Weak<dyn RequestHandler>,
    gate: CallGate,
}

impl Service {
    /// The service in front of `handler`, without a cluster key (the fuzz targets call it
    /// directly, message by message).
    #[cfg(test)]
    pub(crate) fn new(handler: Weak<dyn RequestHandler>) -> Self {
        Self { handler, gate: CallGate::default() }
    }

    fn handler(&self) -> std::result::Result<std::sync::Arc<dyn RequestHandler>, Status> {
        self.handler.upgrade().ok_or_else(|| Status::unavailable("the node is shutting down"))
    }
}

/// The status a core error answers with; its metadata names the error's kind.
fn status(error: Error) -> Status {
    let kind = tonic::metadata::MetadataValue::from_static(error.kind());
    let mut status = status_code(error);
    status.metadata_mut().insert(ERROR_KIND_KEY, kind);
    status
}

/// The status whose code matches a core error's kind.
fn status_code(error: Error) -> Status {
    let message = error.to_string();
    match error {
        Error::InvalidTensor(_) | Error::InvalidShard(_) | Error::InvalidArgument(_) => {
            Status::invalid_argument(message)
        }
        Error::InvalidModel(_)
        | Error::ContextOverflow(_)
        | Error::ConfigNotFound(_)
        | Error::InvalidConfig(_) => Status::failed_precondition(message),
        Error::CacheEvicted(_) | Error::RequestFailed(_) => Status::aborted(message),
        Error::Stalled(_) => Status::deadline_exceeded(message),
        Error::Peer(_) | Error::Connection(_) | Error::Discovery(_) | Error::InferenceServer(_) => {
            Status::unavailable(message)
        }
        Error::InsufficientMemory(_) => Status::resource_exhausted(message),
        Error::NotFound(_) => Status::not_found(message),
        Error::Unauthorized(_) => Status::permission_denied(message),
        Error::Integrity(_) | Error::Offline(_) | Error::Download(_) => Status::failed_precondition(message),
        Error::Backend(_) | Error::StandIn(_) => Status::internal(message),
    }
}

/// A shard from the wire: present and with a valid layer range.
fn shard(message: Option<proto::Shard>) -> std::result::Result<Shard, Status> {
    let shard: Shard = message.ok_or_else(|| Status::invalid_argument("the request has no shard"))?.into();
    shard.validate().map_err(status)?;
    Ok(shard)
}

fn state(
    message: Option<proto::InferenceState>,
) -> std::result::Result<Option<crate::engine::InferenceState>, Status> {
    message.map(state_from_proto).transpose().map_err(status)
}

fn empty_tensor() -> proto::Tensor {
    proto::Tensor { tensor_data: Vec::new(), shape: Vec::new(), dtype: String::new() }
}

#[async_trait]
impl NodeService for Service {
    async fn send_prompt(
        &self,
        request: Request<proto::PromptRequest>,
    ) -> std::result::Result<Response<proto::Tensor>, Status> {
        let message = request.into_inner();
        let (shard, state) = (shard(message.shard)?, state(message.inference_state)?);
        self.handler()?
            .handle_prompt(shard, message.prompt, message.request_id, state)
            .await
            .map_err(status)?;
        Ok(Response::new(empty_tensor()))
    }

    async fn send_tensor(
        &self,
        request: Request<proto::TensorRequest>,
    ) -> std::result::Result<Response<proto::Tensor>, Status> {
        let message = request.into_inner();
        let shard = shard(message.shard)?;
        let tensor = message.tensor.ok_or_else(|| Status::invalid_argument("the request has no tensor"))?;
        let tensor = WireTensor::from_proto(tensor).map_err(status)?;
        let state = state(message.inference_state)?;
        self.handler()?.handle_tensor(shard, tensor, message.request_id, state).await.map_err(status)?;
        Ok(Response::new(empty_tensor()))
    }

    async fn send_example(
        &self,
        request: Request<proto::ExampleRequest>,
    ) -> std::result::Result<Response<proto::Loss>, Status> {
        let message = request.into_inner();
        let shard = shard(message.shard)?;
        let tensor = |field: Option<proto::Tensor>, name: &str| {
            let tensor =
                field.ok_or_else(|| Status::invalid_argument(format!("the example has no {name} tensor")))?;
            WireTensor::from_proto(tensor).map_err(status)
        };
        let example = Example {
            input: tensor(message.example, "example")?,
            target: tensor(message.target, "target")?,
            lengths: tensor(message.length, "length")?,
        };
        let loss = self
            .handler()?
            .handle_example(shard, example, message.train, message.request_id)
            .await
            .map_err(status)?;
        let grads = loss.grads.map(WireTensor::into_proto).transpose().map_err(status)?;
        Ok(Response::new(proto::Loss { loss: loss.loss, grads }))
    }

    async fn collect_topology(
        &self,
        request: Request<proto::CollectTopologyRequest>,
    ) -> std::result::Result<Response<proto::Topology>, Status> {
        let message = request.into_inner();
        let visited: BTreeSet<String> = message.visited.into_iter().collect();
        let topology =
            self.handler()?.handle_collect_topology(visited, message.max_depth).await.map_err(status)?;
        Ok(Response::new(proto::Topology::from(&topology)))
    }

    async fn send_result(
        &self,
        request: Request<proto::SendResultRequest>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let message = request.into_inner();
        let tokens = message
            .result
            .iter()
            .map(|&t| {
                u32::try_from(t).map_err(|_| Status::invalid_argument(format!("negative token id {t}")))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        self.handler()?.handle_result(message.request_id, tokens, message.is_finished).await;
        Ok(Response::new(proto::Empty {}))
    }

    async fn send_opaque_status(
        &self,
        request: Request<proto::SendOpaqueStatusRequest>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let message = request.into_inner();
        self.handler()?.handle_opaque_status(message.request_id, message.status).await;
        Ok(Response::new(proto::Empty {}))
    }

    async fn health_check(
        &self,
        request: Request<proto::HealthCheckRequest>,
    ) -> std::result::Result<Response<proto::HealthCheckResponse>, Status> {
        let handler = self.handler.upgrade();
        let mut response = Response::new(proto::HealthCheckResponse { is_healthy: handler.is_some() });
        let version = tonic::metadata::MetadataValue::from_static(env!("CARGO_PKG_VERSION"));
        response.metadata_mut().insert(crate::net::XOTORCH_CORE_HEADER, version);
        let engine = handler.and_then(|h| h.engine_name()).and_then(|name| name.parse().ok());
        if let Some(engine) = engine {
            response.metadata_mut().insert(crate::net::XOTORCH_ENGINE_HEADER, engine);
        }
        self.gate.prove_answer(&request, &mut response);
        Ok(response)
    }
}
