//! Peer handles for Python: the native `NativePeerHandle` and classic's `GRPCPeerHandle`,
//! and an adapter that lets a Python object with classic's `PeerHandle` methods stand in.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use pyo3::prelude::*;

use super::asyncio::{call_coroutine, with_python};
use super::convert::{prompt_args, state_from_py, tensor_args};
use super::example::{example_from_py, LossReply};
use super::shard::PyShard;
use super::tensor::wire_from_ndarray;
use super::topology::{PyDeviceCapabilities, PyTopology};
use crate::engine::InferenceState;
use crate::error::{Error, Result};
use crate::net::cluster_key::ClusterKey;
use crate::net::grpc::GrpcPeer;
use crate::net::{PeerHandle, PeerIdentity};
use crate::shard::Shard;
use crate::tensor::WireTensor;
use crate::topology::{DeviceCapabilities, Topology};

/// A peer handle from Python: a native handle as is, any other object through an adapter.
pub fn peer_from_py(object: &Bound<'_, PyAny>) -> PyResult<Arc<dyn PeerHandle>> {
    if let Ok(native) = object.cast::<PyPeerHandle>() {
        return Ok(native.get().inner.clone());
    }
    for method in ["id", "addr", "description", "device_capabilities", "health_check", "send_tensor"] {
        if !object.hasattr(method)? {
            return Err(Error::InvalidArgument(format!("a peer handle needs a {method}() method")).into());
        }
    }
    let text = |method: &str| -> String {
        object.call_method0(method).and_then(|v| v.str()?.extract()).unwrap_or_default()
    };
    let identity = PeerIdentity::new(text("id"), text("addr"), text("description"));
    Ok(Arc::new(PythonPeer { object: object.clone().unbind(), identity }))
}

/// A Python object with exo classic's `PeerHandle` methods; its `id()`, `addr()` and
/// `description()` are read once, when it is adapted (a method that raises reads as "").
struct PythonPeer {
    object: Py<PyAny>,
    identity: PeerIdentity,
}

#[async_trait]
impl PeerHandle for PythonPeer {
    fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    fn device_capabilities(&self) -> DeviceCapabilities {
        with_python(|py| {
            let caps = self.object.bind(py).call_method0("device_capabilities")?;
            Ok(caps.extract::<PyDeviceCapabilities>()?.inner)
        })
        .unwrap_or_else(|_| DeviceCapabilities::unknown())
    }

    async fn connect(&self) -> Result<()> {
        call_coroutine(&self.object, "connect", ()).await.map(|_| ())
    }

    async fn is_connected(&self) -> bool {
        match call_coroutine(&self.object, "is_connected", ()).await {
            Ok(value) => with_python(|py| value.bind(py).is_truthy()).unwrap_or(false),
            Err(_) => false,
        }
    }

    async fn disconnect(&self) -> Result<()> {
        call_coroutine(&self.object, "disconnect", ()).await.map(|_| ())
    }

    async fn health_check(&self) -> bool {
        match call_coroutine(&self.object, "health_check", ()).await {
            Ok(value) => with_python(|py| value.bind(py).is_truthy()).unwrap_or(false),
            Err(_) => false,
        }
    }

    async fn send_prompt(
        &self,
        shard: &Shard,
        prompt: &str,
        request_id: &str,
        state: Option<InferenceState>,
    ) -> Result<()> {
        let args = prompt_args(shard.clone(), prompt.to_string(), Some(request_id.to_string()), state)?;
        call_coroutine(&self.object, "send_prompt", args).await.map(|_| ())
    }

    async fn send_tensor(
        &self,
        shard: &Shard,
        tensor: WireTensor,
        request_id: &str,
        state: Option<InferenceState>,
    ) -> Result<()> {
        let args = tensor_args(shard.clone(), tensor, Some(request_id.to_string()), state)?;
        call_coroutine(&self.object, "send_tensor", args).await.map(|_| ())
    }

    async fn send_result(&self, request_id: &str, tokens: &[u32], is_finished: bool) -> Result<()> {
        let args = (request_id.to_string(), tokens.to_vec(), is_finished);
        call_coroutine(&self.object, "send_result", args).await.map(|_| ())
    }

    async fn send_opaque_status(&self, request_id: &str, status: &str) -> Result<()> {
        let args = (request_id.to_string(), status.to_string());
        call_coroutine(&self.object, "send_opaque_status", args).await.map(|_| ())
    }

    async fn collect_topology(&self, visited: &BTreeSet<String>, max_depth: i32) -> Result<Topology> {
        let args = (visited.clone(), max_depth);
        let topology = call_coroutine(&self.object, "collect_topology", args).await?;
        with_python(|py| topology.bind(py).extract::<PyTopology>().map(|t| t.inner).map_err(PyErr::from))
            .map_err(|e| Error::StandIn(format!("collect_topology(): {e}")))
    }
}

/// A native peer handle (`exo.networking.peer_handle`); every call is awaitable.
#[pyclass(name = "NativePeerHandle", module = "exo.networking.peer_handle", subclass, frozen)]
pub struct PyPeerHandle {
    pub inner: Arc<dyn PeerHandle>,
}

#[pymethods]
impl PyPeerHandle {
    /// The peer's node id.
    fn id(&self) -> String {
        self.inner.id()
    }

    /// Where the peer listens (`host:port`).
    fn addr(&self) -> String {
        self.inner.addr()
    }

    /// How the peer was found.
    fn description(&self) -> String {
        self.inner.description()
    }

    /// The peer's device.
    fn device_capabilities(&self) -> PyDeviceCapabilities {
        PyDeviceCapabilities { inner: self.inner.device_capabilities() }
    }

    fn connect<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let peer = self.inner.clone();
        super::asyncio::future_into_py(py, async move { Ok(peer.connect().await?) })
    }

    fn is_connected<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let peer = self.inner.clone();
        super::asyncio::future_into_py(py, async move { Ok(peer.is_connected().await) })
    }

    fn disconnect<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let peer = self.inner.clone();
        super::asyncio::future_into_py(py, async move { Ok(peer.disconnect().await?) })
    }

    fn health_check<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let peer = self.inner.clone();
        super::asyncio::future_into_py(py, async move { Ok(peer.health_check().await) })
    }

    #[pyo3(signature = (shard, prompt, request_id=None, inference_state=None))]
    fn send_prompt<'py>(
        &self,
        py: Python<'py>,
        shard: PyShard,
        prompt: String,
        request_id: Option<String>,
        inference_state: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (peer, state) = (self.inner.clone(), state_from_py(inference_state)?);
        let request_id = request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        super::asyncio::future_into_py(py, async move {
            Ok(peer.send_prompt(&shard.inner, &prompt, &request_id, state).await?)
        })
    }

    #[pyo3(signature = (shard, tensor, request_id=None, inference_state=None))]
    fn send_tensor<'py>(
        &self,
        py: Python<'py>,
        shard: PyShard,
        tensor: &Bound<'py, PyAny>,
        request_id: Option<String>,
        inference_state: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (peer, tensor, state) =
            (self.inner.clone(), wire_from_ndarray(tensor)?, state_from_py(inference_state)?);
        let request_id = request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        super::asyncio::future_into_py(py, async move {
            Ok(peer.send_tensor(&shard.inner, tensor, &request_id, state).await?)
        })
    }

    /// Sends an example to the peer's `shard` and the ring after it (`SendExample`);
    /// resolves to the loss, or `(loss, grads)` when a gradient came back.
    #[pyo3(signature = (shard, example, target, length, train=false, request_id=None))]
    #[allow(clippy::too_many_arguments)]
    fn send_example<'py>(
        &self,
        py: Python<'py>,
        shard: PyShard,
        example: &Bound<'py, PyAny>,
        target: &Bound<'py, PyAny>,
        length: &Bound<'py, PyAny>,
        train: bool,
        request_id: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (peer, example) = (self.inner.clone(), example_from_py(example, target, length)?);
        let request_id = request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        super::asyncio::future_into_py(py, async move {
            Ok(LossReply(peer.send_example(&shard.inner, example, train, &request_id).await?))
        })
    }

    fn send_result<'py>(
        &self,
        py: Python<'py>,
        request_id: String,
        result: Vec<u32>,
        is_finished: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let peer = self.inner.clone();
        super::asyncio::future_into_py(py, async move {
            Ok(peer.send_result(&request_id, &result, is_finished).await?)
        })
    }

    fn send_opaque_status<'py>(
        &self,
        py: Python<'py>,
        request_id: String,
        status: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let peer = self.inner.clone();
        super::asyncio::future_into_py(
            py,
            async move { Ok(peer.send_opaque_status(&request_id, &status).await?) },
        )
    }

    #[pyo3(signature = (visited, max_depth=4))]
    fn collect_topology<'py>(
        &self,
        py: Python<'py>,
        visited: BTreeSet<String>,
        max_depth: i32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let peer = self.inner.clone();
        super::asyncio::future_into_py(py, async move {
            Ok(PyTopology { inner: peer.collect_topology(&visited, max_depth).await? })
        })
    }

    fn __repr__(&self) -> String {
        format!("PeerHandle(id={:?}, addr={:?})", self.inner.id(), self.inner.addr())
    }
}

/// exo classic's `GRPCPeerHandle(_id, address, desc, device_capabilities)`; with a
/// `cluster_key`, its calls prove the key and the peer must prove it back.
#[pyclass(name = "GRPCPeerHandle", module = "exo.networking.grpc.grpc_peer_handle", extends = PyPeerHandle, frozen)]
pub struct PyGrpcPeerHandle {
    peer: Arc<GrpcPeer>,
}

#[pymethods]
impl PyGrpcPeerHandle {
    #[new]
    #[pyo3(signature = (_id, address, desc, device_capabilities, cluster_key=None))]
    fn new(
        _id: String,
        address: String,
        desc: String,
        device_capabilities: PyDeviceCapabilities,
        cluster_key: Option<&str>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let key = cluster_key.map(ClusterKey::new).transpose()?;
        let peer =
            Arc::new(GrpcPeer::new(_id, address, desc, device_capabilities.inner).with_cluster_key(key));
        Ok(PyClassInitializer::from(PyPeerHandle { inner: peer.clone() }).add_subclass(Self { peer }))
    }

    /// Median seconds of `calls` SendTensor round trips carrying `[1, 1, hidden_size]` f32
    /// hidden states that the peer rejects unread: one hop's transport cost, timed in Rust.
    #[pyo3(signature = (hidden_size, calls=200))]
    fn measure_round_trip<'py>(
        &self,
        py: Python<'py>,
        hidden_size: usize,
        calls: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        if calls == 0 || hidden_size == 0 {
            return Err(Error::InvalidArgument("hidden_size and calls must be positive".into()).into());
        }
        // The core also bounds hidden_size by the message limit; that error comes on await.
        let peer = self.peer.clone();
        super::asyncio::future_into_py(py, async move {
            let mut times = peer.tensor_round_trips(hidden_size, calls).await?;
            times.sort();
            Ok(times[times.len() / 2].as_secs_f64())
        })
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPeerHandle>()?;
    m.add_class::<PyGrpcPeerHandle>()?;
    Ok(())
}
