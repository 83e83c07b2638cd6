//! Device capabilities, `Topology` and partitioning, as `exo.topology` exposes them.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PySet};

use super::gc::{FromPy, HoldsPython};
use super::shard::PyShard;
use crate::topology::{
    chip_flops, detect_device_capabilities, map_partitions_to_shards, DeviceCapabilities, DeviceFlops,
    Partition, PartitioningStrategy, PeerConnection, RingMemoryWeightedPartitioning, Topology,
};

/// Peak throughput in TFLOPS (`fp32`, `fp16`, `int8`).
#[pyclass(name = "DeviceFlops", module = "exo.topology.device_capabilities", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PyDeviceFlops {
    pub inner: DeviceFlops,
}

#[pymethods]
impl PyDeviceFlops {
    #[new]
    #[pyo3(signature = (fp32, fp16, int8))]
    fn new(fp32: f64, fp16: f64, int8: f64) -> Self {
        Self { inner: DeviceFlops::new(fp32, fp16, int8) }
    }

    #[getter]
    fn fp32(&self) -> f64 {
        self.inner.fp32
    }

    #[getter]
    fn fp16(&self) -> f64 {
        self.inner.fp16
    }

    #[getter]
    fn int8(&self) -> f64 {
        self.inner.int8
    }

    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &self.inner.to_json())
    }

    fn __str__(&self) -> String {
        self.inner.to_string()
    }

    fn __repr__(&self) -> String {
        let f = &self.inner;
        format!("DeviceFlops(fp32={:?}, fp16={:?}, int8={:?})", f.fp32, f.fp16, f.int8)
    }
}

/// A node's device: model, chip, memory in MB and peak throughput.
#[pyclass(
    name = "DeviceCapabilities",
    module = "exo.topology.device_capabilities",
    frozen,
    eq,
    from_py_object
)]
#[derive(Clone, PartialEq)]
pub struct PyDeviceCapabilities {
    pub inner: DeviceCapabilities,
}

#[pymethods]
impl PyDeviceCapabilities {
    /// `flops` may be a `DeviceFlops` or a dict with its three keys (as in discovery JSON).
    #[new]
    #[pyo3(signature = (model, chip, memory, flops))]
    fn new(model: String, chip: String, memory: u64, flops: &Bound<'_, PyAny>) -> PyResult<Self> {
        let flops = match flops.cast::<PyDeviceFlops>() {
            Ok(f) => f.get().inner,
            Err(_) => DeviceFlops::new(
                flops.get_item("fp32")?.extract()?,
                flops.get_item("fp16")?.extract()?,
                flops.get_item("int8")?.extract()?,
            ),
        };
        Ok(Self { inner: DeviceCapabilities::new(model, chip, memory, flops) })
    }

    #[getter]
    fn model(&self) -> &str {
        &self.inner.model
    }

    #[getter]
    fn chip(&self) -> &str {
        &self.inner.chip
    }

    #[getter]
    fn memory(&self) -> u64 {
        self.inner.memory
    }

    #[getter]
    fn flops(&self) -> PyDeviceFlops {
        PyDeviceFlops { inner: self.inner.flops }
    }

    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &self.inner.to_json())
    }

    fn __str__(&self) -> String {
        self.inner.to_string()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let c = &self.inner;
        Ok(format!(
            "DeviceCapabilities(model={}, chip={}, memory={}, flops={})",
            c.model.as_str().into_pyobject(py)?.repr()?,
            c.chip.as_str().into_pyobject(py)?.repr()?,
            c.memory,
            self.flops().__repr__()
        ))
    }
}

/// A directed connection between two nodes; equal when both ends are equal.
#[pyclass(name = "PeerConnection", module = "exo.topology.topology", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PyPeerConnection {
    pub inner: PeerConnection,
}

#[pymethods]
impl PyPeerConnection {
    #[new]
    #[pyo3(signature = (from_id, to_id, description=None))]
    fn new(from_id: String, to_id: String, description: Option<String>) -> Self {
        Self { inner: PeerConnection { from_id, to_id, description } }
    }

    #[getter(from_id)]
    fn source_id(&self) -> &str {
        &self.inner.from_id
    }

    #[getter]
    fn to_id(&self) -> &str {
        &self.inner.to_id
    }

    #[getter]
    fn description(&self) -> Option<&str> {
        self.inner.description.as_deref()
    }

    fn __repr__(&self) -> String {
        let c = &self.inner;
        format!(
            "PeerConnection(from_id={:?}, to_id={:?}, description={:?})",
            c.from_id, c.to_id, c.description
        )
    }
}

/// The cluster graph: node capabilities and peer connections.
#[pyclass(name = "Topology", module = "exo.topology.topology", from_py_object)]
#[derive(Clone, Default)]
pub struct PyTopology {
    pub inner: Topology,
}

#[pymethods]
impl PyTopology {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    fn update_node(&mut self, node_id: String, device_capabilities: &PyDeviceCapabilities) {
        self.inner.update_node(node_id, device_capabilities.inner.clone());
    }

    fn get_node(&self, node_id: &str) -> Option<PyDeviceCapabilities> {
        self.inner.get_node(node_id).map(|c| PyDeviceCapabilities { inner: c.clone() })
    }

    /// `(node_id, DeviceCapabilities)` pairs in the order nodes were first seen.
    fn all_nodes(&self) -> Vec<(String, PyDeviceCapabilities)> {
        self.inner
            .nodes
            .iter()
            .map(|(id, c)| (id.clone(), PyDeviceCapabilities { inner: c.clone() }))
            .collect()
    }

    #[pyo3(signature = (from_id, to_id, description=None))]
    fn add_edge(&mut self, from_id: &str, to_id: &str, description: Option<String>) {
        self.inner.add_edge(from_id, to_id, description);
    }

    fn merge(&mut self, peer_node_id: &str, other: &PyTopology) {
        self.inner.merge(peer_node_id, &other.inner);
    }

    /// A copy of the node table (`{node_id: DeviceCapabilities}`).
    #[getter]
    fn nodes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (id, caps) in &self.inner.nodes {
            dict.set_item(id, PyDeviceCapabilities { inner: caps.clone() })?;
        }
        Ok(dict)
    }

    /// A copy of the connections (`{node_id: {PeerConnection, ...}}`).
    #[getter]
    fn peer_graph<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (id, connections) in &self.inner.peer_graph {
            let set = PySet::empty(py)?;
            for connection in connections {
                set.add(PyPeerConnection { inner: connection.clone() })?;
            }
            dict.set_item(id, set)?;
        }
        Ok(dict)
    }

    #[getter]
    fn active_node_id(&self) -> Option<&str> {
        self.inner.active_node_id.as_deref()
    }

    #[setter]
    fn set_active_node_id(&mut self, node_id: Option<String>) {
        self.inner.active_node_id = node_id;
    }

    fn to_json<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &self.inner.to_json())
    }

    fn __str__(&self) -> String {
        let nodes: Vec<_> = self.inner.nodes.iter().map(|(id, caps)| format!("{id}: {caps}")).collect();
        let edges: Vec<_> = self
            .inner
            .peer_graph
            .iter()
            .map(|(id, connections)| {
                let targets: Vec<_> = connections
                    .iter()
                    .map(|c| format!("'{}({})'", c.to_id, c.description.as_deref().unwrap_or("None")))
                    .collect();
                format!("{id}: [{}]", targets.join(", "))
            })
            .collect();
        format!("Topology(Nodes: {{{}}}, Edges: {{{}}})", nodes.join(", "), edges.join(", "))
    }
}

/// A node's share `[start, end)` of the model's layers, as fractions of 1.
#[pyclass(name = "Partition", module = "exo.topology.partitioning_strategy", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PyPartition {
    pub inner: Partition,
}

#[pymethods]
impl PyPartition {
    #[new]
    fn new(node_id: String, start: f64, end: f64) -> Self {
        Self { inner: Partition { node_id, start, end } }
    }

    #[getter]
    fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    #[getter]
    fn start(&self) -> f64 {
        self.inner.start
    }

    #[getter]
    fn end(&self) -> f64 {
        self.inner.end
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let p = &self.inner;
        let node_id = p.node_id.as_str().into_pyobject(py)?.repr()?;
        Ok(format!("Partition(node_id={node_id}, start={:?}, end={:?})", p.start, p.end))
    }
}

/// exo classic's default strategy: memory-weighted shares around a ring.
#[pyclass(
    name = "RingMemoryWeightedPartitioningStrategy",
    module = "exo.topology.ring_memory_weighted_partitioning_strategy"
)]
#[derive(Default)]
pub struct PyRingMemoryWeightedPartitioningStrategy;

#[pymethods]
impl PyRingMemoryWeightedPartitioningStrategy {
    #[new]
    fn new() -> Self {
        Self
    }

    fn partition(&self, topology: &PyTopology) -> Vec<PyPartition> {
        RingMemoryWeightedPartitioning
            .partition(&topology.inner)
            .into_iter()
            .map(|inner| PyPartition { inner })
            .collect()
    }
}

/// A partitioning strategy from Python: the native one as is, any object with a
/// `partition(topology)` method through an adapter.
pub fn strategy_from_py(object: Option<&Bound<'_, PyAny>>) -> PyResult<FromPy<dyn PartitioningStrategy>> {
    let Some(object) = object.filter(|o| !o.is_none()) else {
        return Ok(FromPy::native(std::sync::Arc::new(RingMemoryWeightedPartitioning)));
    };
    if object.cast::<PyRingMemoryWeightedPartitioningStrategy>().is_ok() {
        return Ok(FromPy::native(std::sync::Arc::new(RingMemoryWeightedPartitioning)));
    }
    if !object.hasattr("partition")? {
        return Err(crate::error::Error::InvalidArgument(
            "a partitioning strategy needs a partition() method".into(),
        )
        .into());
    }
    let stand_in = std::sync::Arc::new(PythonStrategy { object: object.clone().unbind() });
    Ok(FromPy { core: stand_in.clone(), stand_in: Some(stand_in) })
}

/// A Python object with a `partition(topology)` method.
struct PythonStrategy {
    object: Py<PyAny>,
}

impl HoldsPython for PythonStrategy {
    fn python_object(&self) -> &Py<PyAny> {
        &self.object
    }
}

impl PartitioningStrategy for PythonStrategy {
    /// The object's partitions; when it raises, the error is logged and no node gets layers.
    fn partition(&self, topology: &Topology) -> Vec<Partition> {
        let partitions = super::asyncio::with_python(|py| {
            let topology = PyTopology { inner: topology.clone() };
            let partitions = self.object.bind(py).call_method1("partition", (topology,))?;
            partitions.try_iter()?.map(|p| partition_from_py(&p?)).collect::<PyResult<Vec<_>>>()
        });
        partitions.unwrap_or_else(|e| {
            log::error!("the Python partitioning strategy failed: {e}");
            Vec::new()
        })
    }
}

/// Reads any object with `node_id`, `start` and `end` attributes as a partition.
fn partition_from_py(object: &Bound<'_, PyAny>) -> PyResult<Partition> {
    Ok(Partition {
        node_id: object.getattr("node_id")?.extract()?,
        start: object.getattr("start")?.extract()?,
        end: object.getattr("end")?.extract()?,
    })
}

/// Layer ranges for partitions: every layer in exactly one shard, in partition order.
#[pyfunction(name = "map_partitions_to_shards")]
fn py_map_partitions_to_shards(
    partitions: Vec<Bound<'_, PyAny>>,
    num_layers: i32,
    model_id: &str,
) -> PyResult<Vec<PyShard>> {
    let partitions = partitions.iter().map(partition_from_py).collect::<PyResult<Vec<_>>>()?;
    Ok(map_partitions_to_shards(&partitions, num_layers, model_id)
        .into_iter()
        .map(|inner| PyShard { inner })
        .collect())
}

/// Detects this machine's capabilities off the event loop; returns an awaitable.
#[pyfunction]
fn device_capabilities(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    super::asyncio::future_into_py(py, async {
        let caps = tokio::task::spawn_blocking(detect_device_capabilities).await.map_err(|e| {
            pyo3::exceptions::PyRuntimeError::new_err(format!("device detection failed: {e}"))
        })?;
        Ok(PyDeviceCapabilities { inner: caps })
    })
}

/// Converts a JSON value to the equivalent Python object via the `json` module.
fn json_to_py<'py>(py: Python<'py>, value: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (value.to_string(),))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDeviceFlops>()?;
    m.add_class::<PyDeviceCapabilities>()?;
    m.add_class::<PyPeerConnection>()?;
    m.add_class::<PyTopology>()?;
    m.add_class::<PyPartition>()?;
    m.add_class::<PyRingMemoryWeightedPartitioningStrategy>()?;
    m.add_function(wrap_pyfunction!(py_map_partitions_to_shards, m)?)?;
    m.add_function(wrap_pyfunction!(device_capabilities, m)?)?;
    m.add("TFLOPS", 1.0)?;
    m.add("UNKNOWN_DEVICE_CAPABILITIES", PyDeviceCapabilities { inner: DeviceCapabilities::unknown() })?;
    let table = PyDict::new(m.py());
    for (chip, flops) in chip_flops() {
        table.set_item(chip, PyDeviceFlops { inner: *flops })?;
    }
    m.add("CHIP_FLOPS", table)?;
    Ok(())
}
