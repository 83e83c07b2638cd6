//! Peer handles and discoveries for Python: adapters that let a Python object with
//! exo classic's peer methods stand in for a Rust peer, and the native discovery base class.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use pyo3::prelude::*;

use super::asyncio::call_coroutine;
use super::topology::PyDeviceCapabilities;
use crate::engine::InferenceState;
use crate::error::{Error, Result};
use crate::net::{Discovery, PeerHandle};
use crate::shard::Shard;
use crate::tensor::WireTensor;
use crate::topology::{DeviceCapabilities, Topology};

/// A peer handle from Python: a native handle as is, any other object through an adapter.
pub fn peer_from_py(object: &Bound<'_, PyAny>) -> PyResult<Arc<dyn PeerHandle>> {
    if let Ok(native) = object.cast::<PyPeerHandle>() {
        return Ok(native.get().inner.clone());
    }
    for method in ["id", "addr", "description", "device_capabilities", "health_check"] {
        if !object.hasattr(method)? {
            return Err(Error::InvalidArgument(format!("a peer handle needs a {method}() method")).into());
        }
    }
    Ok(Arc::new(PythonPeer { object: object.clone().unbind() }))
}

/// A Python object with exo classic's `PeerHandle` methods.
struct PythonPeer {
    object: Py<PyAny>,
}

impl PythonPeer {
    fn text(&self, method: &str) -> String {
        Python::attach(|py| self.object.bind(py).call_method0(method).and_then(|v| v.str()?.extract()))
            .unwrap_or_default()
    }

    async fn truthy(&self, method: &str) -> bool {
        match call_coroutine(&self.object, method, ()).await {
            Ok(value) => Python::attach(|py| value.bind(py).is_truthy().unwrap_or(false)),
            Err(_) => false,
        }
    }

    fn unsupported<T>(&self, method: &str) -> Result<T> {
        Err(Error::InvalidArgument(format!("{method} is not available through this adapter")))
    }
}

#[async_trait]
impl PeerHandle for PythonPeer {
    fn id(&self) -> String {
        self.text("id")
    }

    fn addr(&self) -> String {
        self.text("addr")
    }

    fn description(&self) -> String {
        self.text("description")
    }

    fn device_capabilities(&self) -> DeviceCapabilities {
        Python::attach(|py| {
            let caps = self.object.bind(py).call_method0("device_capabilities")?;
            Ok::<_, PyErr>(caps.cast::<PyDeviceCapabilities>()?.get().inner.clone())
        })
        .unwrap_or_else(|_| DeviceCapabilities::unknown())
    }

    async fn connect(&self) -> Result<()> {
        call_coroutine(&self.object, "connect", ()).await.map(|_| ())
    }

    async fn is_connected(&self) -> bool {
        self.truthy("is_connected").await
    }

    async fn disconnect(&self) -> Result<()> {
        call_coroutine(&self.object, "disconnect", ()).await.map(|_| ())
    }

    async fn health_check(&self) -> bool {
        self.truthy("health_check").await
    }

    async fn send_prompt(&self, _: &Shard, _: &str, _: &str, _: Option<InferenceState>) -> Result<()> {
        self.unsupported("send_prompt")
    }

    async fn send_tensor(&self, _: &Shard, _: WireTensor, _: &str, _: Option<InferenceState>) -> Result<()> {
        self.unsupported("send_tensor")
    }

    async fn send_result(&self, request_id: &str, tokens: &[u32], is_finished: bool) -> Result<()> {
        let args = (request_id.to_string(), tokens.to_vec(), is_finished);
        call_coroutine(&self.object, "send_result", args).await.map(|_| ())
    }

    async fn send_opaque_status(&self, request_id: &str, status: &str) -> Result<()> {
        let args = (request_id.to_string(), status.to_string());
        call_coroutine(&self.object, "send_opaque_status", args).await.map(|_| ())
    }

    async fn collect_topology(&self, _: &BTreeSet<String>, _: i32) -> Result<Topology> {
        self.unsupported("collect_topology")
    }
}

/// A native peer handle (`exo.networking.peer_handle`); network calls are awaitable.
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
        pyo3_async_runtimes::tokio::future_into_py(py, async move { Ok(peer.connect().await?) })
    }

    fn is_connected<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let peer = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move { Ok(peer.is_connected().await) })
    }

    fn disconnect<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let peer = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move { Ok(peer.disconnect().await?) })
    }

    fn health_check<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let peer = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move { Ok(peer.health_check().await) })
    }

    fn __repr__(&self) -> String {
        format!("PeerHandle(id={:?}, addr={:?})", self.inner.id(), self.inner.addr())
    }
}

/// A native discovery (`exo.networking.discovery`); the UDP, manual and Tailscale
/// discoveries derive from it.
#[pyclass(name = "NativeDiscovery", module = "exo.networking.discovery", subclass, frozen)]
pub struct PyDiscovery {
    pub inner: Arc<dyn Discovery>,
}

#[pymethods]
impl PyDiscovery {
    fn start<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        super::asyncio::remember_running_loop(py);
        let discovery = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move { Ok(discovery.start().await?) })
    }

    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let discovery = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move { Ok(discovery.stop().await?) })
    }

    #[pyo3(signature = (wait_for_peers=0))]
    fn discover_peers<'py>(&self, py: Python<'py>, wait_for_peers: usize) -> PyResult<Bound<'py, PyAny>> {
        let discovery = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let peers = discovery.discover_peers(wait_for_peers).await?;
            Ok(peers.into_iter().map(|inner| PyPeerHandle { inner }).collect::<Vec<_>>())
        })
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPeerHandle>()?;
    m.add_class::<PyDiscovery>()?;
    Ok(())
}
