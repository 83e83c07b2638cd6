//! Discoveries for Python: the native `NativeDiscovery` base class, an adapter that lets a
//! Python object with classic's `Discovery` methods stand in, and exo classic's discovery
//! classes (`UDPDiscovery`, `ManualDiscovery`, `TailscaleDiscovery`) with the manual config
//! types over the Rust discoveries.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::asyncio::{call_coroutine, with_python};
use super::gc::{FromPy, HoldsPython};
use super::peer::{peer_from_py, PyPeerHandle};
use super::topology::PyDeviceCapabilities;
use crate::engine::InferenceState;
use crate::error::{Error, Result};
use crate::net::cluster_key::ClusterKey;
use crate::net::discovery::{
    ManualDiscovery, NetworkTopology, PeerConfig, TailscaleConfig, TailscaleDiscovery, UdpConfig,
    UdpDiscovery,
};
use crate::net::{Discovery, PeerFactory, PeerHandle, PeerIdentity};
use crate::shard::Shard;
use crate::tensor::WireTensor;
use crate::topology::{DeviceCapabilities, Topology};

/// A native discovery (`exo.networking.discovery`); the UDP, manual and Tailscale
/// discoveries derive from it.
#[pyclass(name = "NativeDiscovery", module = "exo.networking.discovery", subclass, frozen)]
pub struct PyDiscovery {
    pub inner: Arc<dyn Discovery>,
}

#[pymethods]
impl PyDiscovery {
    /// Also remembers the running loop: discovery health-checks Python peers from background
    /// tasks, before any node has started.
    fn start<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        super::asyncio::remember_running_loop(py);
        let discovery = self.inner.clone();
        super::asyncio::future_into_py(py, async move { Ok(discovery.start().await?) })
    }

    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let discovery = self.inner.clone();
        super::asyncio::future_into_py(py, async move { Ok(discovery.stop().await?) })
    }

    #[pyo3(signature = (wait_for_peers=0))]
    fn discover_peers<'py>(&self, py: Python<'py>, wait_for_peers: usize) -> PyResult<Bound<'py, PyAny>> {
        let discovery = self.inner.clone();
        super::asyncio::future_into_py(py, async move {
            let peers = discovery.discover_peers(wait_for_peers).await?;
            Ok(peers.into_iter().map(|inner| PyPeerHandle { inner }).collect::<Vec<_>>())
        })
    }
}

/// A discovery from Python: a native one as is, any other object through an adapter.
pub fn discovery_from_py(object: &Bound<'_, PyAny>) -> PyResult<FromPy<dyn Discovery>> {
    if let Ok(native) = object.cast::<PyDiscovery>() {
        return Ok(FromPy::native(native.get().inner.clone()));
    }
    for method in ["start", "stop", "discover_peers"] {
        if !object.hasattr(method)? {
            return Err(Error::InvalidArgument(format!("a discovery needs a {method}() method")).into());
        }
    }
    let stand_in = Arc::new(PythonDiscovery { object: object.clone().unbind() });
    Ok(FromPy { core: stand_in.clone(), stand_in: Some(stand_in) })
}

/// A Python object with exo classic's `Discovery` methods.
struct PythonDiscovery {
    object: Py<PyAny>,
}

impl HoldsPython for PythonDiscovery {
    fn python_object(&self) -> &Py<PyAny> {
        &self.object
    }
}

#[async_trait]
impl Discovery for PythonDiscovery {
    async fn start(&self) -> Result<()> {
        call_coroutine(&self.object, "start", ()).await.map(|_| ())
    }

    async fn stop(&self) -> Result<()> {
        call_coroutine(&self.object, "stop", ()).await.map(|_| ())
    }

    async fn discover_peers(&self, wait_for_peers: usize) -> Result<Vec<Arc<dyn PeerHandle>>> {
        let peers = call_coroutine(&self.object, "discover_peers", (wait_for_peers,)).await?;
        with_python(|py| {
            let peers = peers.bind(py);
            let list = PyList::new(py, peers.try_iter()?.collect::<PyResult<Vec<_>>>()?)?;
            list.iter().map(|p| peer_from_py(&p)).collect::<PyResult<Vec<_>>>()
        })
        .map_err(|e| Error::StandIn(format!("discover_peers(): {e}")))
    }
}

/// Turns classic's `create_peer_handle(peer_id, address, description, device_capabilities)`
/// callable into a peer factory. A call that raises, or returns something that is not a peer,
/// is logged and yields a peer that never passes its health check, so it is never added.
fn factory_from_py(create_peer_handle: Py<PyAny>) -> PeerFactory {
    Arc::new(move |id: String, addr: String, description: String, caps: DeviceCapabilities| {
        let made = with_python(|py| {
            let args =
                (id.clone(), addr.clone(), description.clone(), PyDeviceCapabilities { inner: caps.clone() });
            create_peer_handle.bind(py).call1(args).and_then(|peer| peer_from_py(&peer))
        });
        made.unwrap_or_else(|error| {
            log::warn!("create_peer_handle failed for peer {id} at {addr}: {error}");
            let reason = format!("create_peer_handle failed for peer {id} at {addr}: {error}");
            let identity = PeerIdentity::new(id, addr, description);
            Arc::new(UnmadePeer { identity, caps, reason }) as Arc<dyn PeerHandle>
        })
    })
}

/// Stands in for a peer whose handle could not be made: unhealthy, every call fails.
struct UnmadePeer {
    identity: PeerIdentity,
    caps: DeviceCapabilities,
    reason: String,
}

impl UnmadePeer {
    fn fail<T>(&self) -> Result<T> {
        Err(Error::StandIn(self.reason.clone()))
    }
}

#[async_trait]
impl PeerHandle for UnmadePeer {
    fn identity(&self) -> &PeerIdentity {
        &self.identity
    }
    fn device_capabilities(&self) -> DeviceCapabilities {
        self.caps.clone()
    }
    async fn connect(&self) -> Result<()> {
        self.fail()
    }
    async fn is_connected(&self) -> bool {
        false
    }
    async fn disconnect(&self) -> Result<()> {
        Ok(())
    }
    async fn health_check(&self) -> bool {
        false
    }
    async fn send_prompt(&self, _: &Shard, _: &str, _: &str, _: Option<InferenceState>) -> Result<()> {
        self.fail()
    }
    async fn send_tensor(&self, _: &Shard, _: WireTensor, _: &str, _: Option<InferenceState>) -> Result<()> {
        self.fail()
    }
    async fn send_result(&self, _: &str, _: &[u32], _: bool) -> Result<()> {
        self.fail()
    }
    async fn send_opaque_status(&self, _: &str, _: &str) -> Result<()> {
        self.fail()
    }
    async fn collect_topology(&self, _: &BTreeSet<String>, _: i32) -> Result<Topology> {
        self.fail()
    }
}

/// A positive, finite number of seconds.
fn seconds(name: &str, value: f64) -> Result<Duration> {
    if value.is_finite() && value > 0.0 {
        return Ok(Duration::from_secs_f64(value));
    }
    Err(Error::InvalidArgument(format!("{name} must be a positive number of seconds, got {value}")))
}

/// A port number.
fn port(name: &str, value: i64) -> Result<u16> {
    u16::try_from(value)
        .map_err(|_| Error::InvalidArgument(format!("{name} must be a port (0-65535), got {value}")))
}

/// Capabilities to announce: `None` and classic's unknown placeholder mean "detect at start",
/// as classic always detects when starting.
fn announced_capabilities(given: Option<PyRef<'_, PyDeviceCapabilities>>) -> Option<DeviceCapabilities> {
    given.map(|caps| caps.inner.clone()).filter(|caps| *caps != DeviceCapabilities::unknown())
}

/// UDP broadcast discovery with exo classic's constructor.
#[pyclass(name = "UDPDiscovery", module = "exo.networking.udp.udp_discovery", extends = PyDiscovery, frozen)]
pub struct PyUdpDiscovery {
    discovery: Arc<UdpDiscovery>,
}

#[pymethods]
impl PyUdpDiscovery {
    #[new]
    #[pyo3(signature = (
        node_id, node_port, listen_port, broadcast_port, create_peer_handle, broadcast_interval=2.5,
        discovery_timeout=30.0, device_capabilities=None, allowed_node_ids=None, allowed_interface_types=None,
        cluster_key=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        node_id: String,
        node_port: i64,
        listen_port: i64,
        broadcast_port: i64,
        create_peer_handle: Py<PyAny>,
        broadcast_interval: f64,
        discovery_timeout: f64,
        device_capabilities: Option<PyRef<'_, PyDeviceCapabilities>>,
        allowed_node_ids: Option<Vec<String>>,
        allowed_interface_types: Option<Vec<String>>,
        cluster_key: Option<&str>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let mut config = UdpConfig::new(
            node_id,
            port("node_port", node_port)?,
            port("listen_port", listen_port)?,
            port("broadcast_port", broadcast_port)?,
        );
        config.broadcast_interval = seconds("broadcast_interval", broadcast_interval)?;
        config.discovery_timeout = seconds("discovery_timeout", discovery_timeout)?;
        config.device_capabilities = announced_capabilities(device_capabilities);
        config.allowed_node_ids = allowed_node_ids.filter(|ids| !ids.is_empty());
        config.allowed_interface_types = allowed_interface_types.filter(|types| !types.is_empty());
        config.cluster_key = cluster_key.map(ClusterKey::new).transpose()?;
        let discovery = Arc::new(UdpDiscovery::new(config, factory_from_py(create_peer_handle)));
        Ok(PyClassInitializer::from(PyDiscovery { inner: discovery.clone() })
            .add_subclass(Self { discovery }))
    }

    #[getter]
    fn node_id(&self) -> &str {
        &self.discovery.config().node_id
    }

    #[getter]
    fn node_port(&self) -> u16 {
        self.discovery.config().node_port
    }

    #[getter]
    fn listen_port(&self) -> u16 {
        self.discovery.config().listen_port
    }

    #[getter]
    fn broadcast_port(&self) -> u16 {
        self.discovery.config().broadcast_port
    }

    #[getter]
    fn broadcast_interval(&self) -> f64 {
        self.discovery.config().broadcast_interval.as_secs_f64()
    }

    #[getter]
    fn discovery_timeout(&self) -> f64 {
        self.discovery.config().discovery_timeout.as_secs_f64()
    }

    #[getter]
    fn allowed_node_ids(&self) -> Option<Vec<String>> {
        self.discovery.config().allowed_node_ids.clone()
    }

    #[getter]
    fn allowed_interface_types(&self) -> Option<Vec<String>> {
        self.discovery.config().allowed_interface_types.clone()
    }

    /// The capabilities announced: those given, or (once started) those detected.
    #[getter]
    fn device_capabilities(&self) -> PyDeviceCapabilities {
        let caps = self.discovery.device_capabilities().unwrap_or_else(DeviceCapabilities::unknown);
        PyDeviceCapabilities { inner: caps }
    }
}

/// Discovery from a JSON network config, with exo classic's constructor.
#[pyclass(name = "ManualDiscovery", module = "exo.networking.manual.manual_discovery", extends = PyDiscovery, frozen)]
pub struct PyManualDiscovery {
    discovery: Arc<ManualDiscovery>,
}

#[pymethods]
impl PyManualDiscovery {
    #[new]
    #[pyo3(signature = (network_config_path, node_id, create_peer_handle))]
    fn new(
        network_config_path: std::path::PathBuf,
        node_id: String,
        create_peer_handle: Py<PyAny>,
    ) -> PyClassInitializer<Self> {
        let factory = factory_from_py(create_peer_handle);
        let discovery = Arc::new(ManualDiscovery::new(network_config_path, node_id, factory));
        PyClassInitializer::from(PyDiscovery { inner: discovery.clone() }).add_subclass(Self { discovery })
    }

    #[getter]
    fn network_config_path(&self) -> String {
        self.discovery.path().display().to_string()
    }

    #[getter]
    fn node_id(&self) -> &str {
        self.discovery.node_id()
    }
}

/// Discovery through Tailscale's API, with exo classic's constructor; `api_base` (or
/// `EXO_TAILSCALE_API_BASE`) points it elsewhere than api.tailscale.com, `device_id` names
/// this machine's device instead of asking the `tailscale` CLI.
#[pyclass(
    name = "TailscaleDiscovery",
    module = "exo.networking.tailscale.tailscale_discovery",
    extends = PyDiscovery,
    frozen
)]
pub struct PyTailscaleDiscovery {
    discovery: Arc<TailscaleDiscovery>,
}

#[pymethods]
impl PyTailscaleDiscovery {
    #[new]
    #[pyo3(signature = (
        node_id, node_port, create_peer_handle, discovery_interval=5.0, discovery_timeout=30.0,
        update_interval=15.0, device_capabilities=None, tailscale_api_key=None, tailnet=None,
        allowed_node_ids=None, *, api_base=None, device_id=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        node_id: String,
        node_port: i64,
        create_peer_handle: Py<PyAny>,
        discovery_interval: f64,
        discovery_timeout: f64,
        update_interval: f64,
        device_capabilities: Option<PyRef<'_, PyDeviceCapabilities>>,
        tailscale_api_key: Option<String>,
        tailnet: Option<String>,
        allowed_node_ids: Option<Vec<String>>,
        api_base: Option<String>,
        device_id: Option<String>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let mut config = TailscaleConfig::new(node_id, port("node_port", node_port)?);
        config.discovery_interval = seconds("discovery_interval", discovery_interval)?;
        config.discovery_timeout = seconds("discovery_timeout", discovery_timeout)?;
        config.update_interval = seconds("update_interval", update_interval)?;
        config.device_capabilities = announced_capabilities(device_capabilities);
        config.api_key = tailscale_api_key;
        config.tailnet = tailnet;
        config.allowed_node_ids = allowed_node_ids.filter(|ids| !ids.is_empty());
        config.api_base = api_base;
        config.device_id = device_id;
        let discovery = Arc::new(TailscaleDiscovery::new(config, factory_from_py(create_peer_handle)));
        Ok(PyClassInitializer::from(PyDiscovery { inner: discovery.clone() })
            .add_subclass(Self { discovery }))
    }

    #[getter]
    fn node_id(&self) -> &str {
        &self.discovery.config().node_id
    }

    #[getter]
    fn node_port(&self) -> u16 {
        self.discovery.config().node_port
    }

    #[getter]
    fn discovery_interval(&self) -> f64 {
        self.discovery.config().discovery_interval.as_secs_f64()
    }

    #[getter]
    fn discovery_timeout(&self) -> f64 {
        self.discovery.config().discovery_timeout.as_secs_f64()
    }

    #[getter]
    fn update_interval(&self) -> f64 {
        self.discovery.config().update_interval.as_secs_f64()
    }

    #[getter]
    fn tailnet(&self) -> Option<String> {
        self.discovery.config().tailnet.clone()
    }

    #[getter]
    fn allowed_node_ids(&self) -> Option<Vec<String>> {
        self.discovery.config().allowed_node_ids.clone()
    }
}

/// One node of a manual network config.
#[pyclass(name = "PeerConfig", module = "exo.networking.manual.network_topology_config", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PyPeerConfig {
    inner: PeerConfig,
}

#[pymethods]
impl PyPeerConfig {
    #[new]
    #[pyo3(signature = (address, port, device_capabilities))]
    fn new(address: String, port: u16, device_capabilities: PyRef<'_, PyDeviceCapabilities>) -> Self {
        Self { inner: PeerConfig { address, port, device_capabilities: device_capabilities.inner.clone() } }
    }

    #[getter]
    fn address(&self) -> &str {
        &self.inner.address
    }

    #[getter]
    fn port(&self) -> u16 {
        self.inner.port
    }

    #[getter]
    fn device_capabilities(&self) -> PyDeviceCapabilities {
        PyDeviceCapabilities { inner: self.inner.device_capabilities.clone() }
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let caps = Bound::new(py, self.device_capabilities())?.repr()?;
        Ok(format!(
            "PeerConfig(address={:?}, port={}, device_capabilities={caps})",
            self.inner.address, self.inner.port
        ))
    }
}

/// Every node of a manual network config, this node included.
#[pyclass(name = "NetworkTopology", module = "exo.networking.manual.network_topology_config", frozen)]
pub struct PyNetworkTopology {
    inner: NetworkTopology,
}

#[pymethods]
impl PyNetworkTopology {
    /// A topology from `{node_id: PeerConfig}`.
    #[new]
    #[pyo3(signature = (peers))]
    fn new(peers: std::collections::HashMap<String, PyRef<'_, PyPeerConfig>>) -> Self {
        let peers = peers.into_iter().map(|(id, peer)| (id, peer.inner.clone())).collect();
        Self { inner: NetworkTopology { peers } }
    }

    /// Reads and validates a config file; `ConfigNotFoundError` (a `FileNotFoundError`) when
    /// it is missing, `InvalidConfigError` (a `ValueError`) when it does not validate.
    #[staticmethod]
    fn from_path(path: std::path::PathBuf) -> PyResult<Self> {
        Ok(Self { inner: NetworkTopology::from_path(path)? })
    }

    /// Node id to `PeerConfig`, in file order (a new dict each time).
    #[getter]
    fn peers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (id, peer) in &self.inner.peers {
            dict.set_item(id, PyPeerConfig { inner: peer.clone() })?;
        }
        Ok(dict)
    }

    fn __eq__(&self, other: PyRef<'_, Self>) -> bool {
        self.inner == other.inner
    }

    fn __repr__(&self) -> String {
        let ids: Vec<&String> = self.inner.peers.keys().collect();
        format!("NetworkTopology(peers={ids:?})")
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDiscovery>()?;
    m.add_class::<PyUdpDiscovery>()?;
    m.add_class::<PyManualDiscovery>()?;
    m.add_class::<PyTailscaleDiscovery>()?;
    m.add_class::<PyPeerConfig>()?;
    m.add_class::<PyNetworkTopology>()?;
    Ok(())
}
