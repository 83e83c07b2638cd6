//! The node's native core for Python (`exo.orchestration.node.Node` wraps it) and the async
//! iterator of a request's tokens.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use pyo3::PyTraverseError;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::Mutex;

use super::convert::state_from_py;
use super::discovery::discovery_from_py;
use super::engine::engine_from_py;
use super::example::{example_from_py, LossReply};
use super::gc::StandIns;
use super::peer::PyPeerHandle;
use super::server::{server_from_py, PyRequestHandler};
use super::shard::PyShard;
use super::tensor::wire_from_ndarray;
use super::topology::{strategy_from_py, PyDeviceCapabilities, PyPartition, PyTopology};
use crate::node::{GenerateOptions, Node, NodeEvent, NodeSettings, StreamEvent};

/// Most events handed to Python in one `next_events` call.
const EVENT_BATCH: usize = 256;

/// `seconds` as a duration; an `InvalidArgumentError` naming `name` unless it is a finite
/// number above 0.
fn positive_seconds(name: &str, seconds: f64) -> PyResult<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(seconds).ok().filter(|d| !d.is_zero()).ok_or_else(|| {
        crate::error::Error::InvalidArgument(format!(
            "{name} must be a number of seconds above 0, not {seconds}"
        ))
        .into()
    })
}

/// The Rust node behind `exo.orchestration.node.Node`: ring, peers, topology, requests. As a
/// native request handler, a `GRPCServer` serves it directly.
#[pyclass(name = "NativeNode", module = "exo.orchestration.node", extends = PyRequestHandler, frozen)]
pub struct PyNode {
    pub inner: Arc<Node>,
    events: Arc<Mutex<UnboundedReceiver<NodeEvent>>>,
    /// The Python stand-ins among the node's engine, discovery, strategy and server, shown to
    /// the garbage collector: one that refers back to its node still lets both be collected.
    stand_ins: StandIns,
}

#[pymethods]
impl PyNode {
    #[new]
    #[pyo3(signature = (node_id, inference_engine, discovery, partitioning_strategy=None, max_generate_tokens=1024, default_sample_temperature=0.0))]
    fn new(
        node_id: String,
        inference_engine: &Bound<'_, PyAny>,
        discovery: &Bound<'_, PyAny>,
        partitioning_strategy: Option<&Bound<'_, PyAny>>,
        max_generate_tokens: usize,
        default_sample_temperature: f32,
    ) -> PyResult<PyClassInitializer<Self>> {
        let settings = NodeSettings {
            max_generate_tokens,
            default_temperature: default_sample_temperature,
            ..NodeSettings::default()
        };
        let (engine, discovery) = (engine_from_py(inference_engine)?, discovery_from_py(discovery)?);
        let strategy = strategy_from_py(partitioning_strategy)?;
        let stand_ins = StandIns::default();
        stand_ins.set("engine", engine.stand_in);
        stand_ins.set("discovery", discovery.stand_in);
        stand_ins.set("strategy", strategy.stand_in);
        let node = Node::new(node_id, engine.core, discovery.core, strategy.core, settings);
        let events = Arc::new(Mutex::new(node.subscribe()));
        Ok(PyClassInitializer::from(PyRequestHandler { inner: node.clone() }).add_subclass(Self {
            inner: node,
            events,
            stand_ins,
        }))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> std::result::Result<(), PyTraverseError> {
        self.stand_ins.visit(&visit)
    }

    fn __clear__(&self) {
        self.stand_ins.clear();
    }

    /// This node's id.
    #[getter]
    fn id(&self) -> &str {
        self.inner.id()
    }

    /// Sets the server started and stopped with the node (a `GRPCServer` or a stand-in).
    fn set_server(&self, server: &Bound<'_, PyAny>) -> PyResult<()> {
        let server = server_from_py(server)?;
        self.stand_ins.set("server", server.stand_in);
        self.inner.set_server(server.core);
        Ok(())
    }

    #[getter]
    fn max_generate_tokens(&self) -> usize {
        self.inner.settings().max_generate_tokens
    }

    #[setter]
    fn set_max_generate_tokens(&self, value: usize) {
        self.inner.set_settings(NodeSettings { max_generate_tokens: value, ..self.inner.settings() });
    }

    #[getter]
    fn default_sample_temperature(&self) -> f32 {
        self.inner.settings().default_temperature
    }

    #[setter]
    fn set_default_sample_temperature(&self, value: f32) {
        self.inner.set_settings(NodeSettings { default_temperature: value, ..self.inner.settings() });
    }

    /// Seconds a request started here may wait on other nodes with no sign of progress before
    /// it fails with `RequestStalledError`.
    #[getter]
    fn progress_deadline(&self) -> f64 {
        self.inner.settings().progress_deadline.as_secs_f64()
    }

    #[setter]
    fn set_progress_deadline(&self, seconds: f64) -> PyResult<()> {
        let progress_deadline = positive_seconds("progress_deadline", seconds)?;
        self.inner.set_settings(NodeSettings { progress_deadline, ..self.inner.settings() });
        Ok(())
    }

    /// Seconds after a sign that a peer may be loading a model (a request starting, its
    /// download progress) during which it may not answer before it counts as dead.
    #[getter]
    fn loading_grace(&self) -> f64 {
        self.inner.settings().loading_grace.as_secs_f64()
    }

    #[setter]
    fn set_loading_grace(&self, seconds: f64) -> PyResult<()> {
        let loading_grace = positive_seconds("loading_grace", seconds)?;
        self.inner.set_settings(NodeSettings { loading_grace, ..self.inner.settings() });
        Ok(())
    }

    /// This node's device (detected at start).
    #[getter]
    fn device_capabilities(&self) -> PyDeviceCapabilities {
        PyDeviceCapabilities { inner: self.inner.device_capabilities() }
    }

    #[setter]
    fn set_device_capabilities(&self, capabilities: PyDeviceCapabilities) {
        self.inner.set_device_capabilities(capabilities.inner);
    }

    /// The peers in use now.
    #[getter]
    fn peers(&self) -> Vec<PyPeerHandle> {
        self.inner.peers().into_iter().map(|inner| PyPeerHandle { inner }).collect()
    }

    /// A copy of the cluster topology.
    #[getter]
    fn topology(&self) -> PyTopology {
        PyTopology { inner: self.inner.topology() }
    }

    /// The engines the cluster's nodes run, as far as they are known: this node's first.
    fn engines(&self) -> Vec<String> {
        self.inner.engines()
    }

    /// The partitions of the current topology, in ring order.
    fn partitions(&self) -> Vec<PyPartition> {
        self.inner.partitions().into_iter().map(|inner| PyPartition { inner }).collect()
    }

    /// `{request_id: "processing" | "waiting"}` for the requests active here.
    #[getter]
    fn outstanding_requests<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (id, phase) in self.inner.outstanding_requests() {
            dict.set_item(id, phase)?;
        }
        Ok(dict)
    }

    /// The requests running here: one dict each with `request_id`, `phase`, `origin` (or
    /// `None`), `tokens` (sampled here) and `nodes` (ring order, when planned here).
    #[getter]
    fn running_requests<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for summary in self.inner.running_requests() {
            let dict = PyDict::new(py);
            dict.set_item("request_id", summary.request_id)?;
            dict.set_item("phase", summary.phase)?;
            dict.set_item("origin", summary.origin)?;
            dict.set_item("tokens", summary.tokens)?;
            dict.set_item("nodes", summary.nodes)?;
            list.append(dict)?;
        }
        Ok(list)
    }

    #[pyo3(signature = (wait_for_peers=0))]
    fn start<'py>(&self, py: Python<'py>, wait_for_peers: usize) -> PyResult<Bound<'py, PyAny>> {
        super::asyncio::remember_running_loop(py);
        let node = self.inner.clone();
        super::asyncio::future_into_py(py, async move { Ok(node.start(wait_for_peers).await?) })
    }

    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let node = self.inner.clone();
        super::asyncio::future_into_py(py, async move { Ok(node.stop().await?) })
    }

    /// Index of this node's partition moved `offset` places round the ring.
    #[pyo3(signature = (offset=0))]
    fn get_partition_index(&self, offset: usize) -> PyResult<usize> {
        Ok(self.inner.get_partition_index(offset)?)
    }

    /// The shard of `base_shard`'s model that partition `index` (this node's by default) holds.
    #[pyo3(signature = (base_shard, index=None))]
    fn get_current_shard(&self, base_shard: PyShard, index: Option<usize>) -> PyResult<PyShard> {
        Ok(PyShard { inner: self.inner.get_current_shard(&base_shard.inner, index)? })
    }

    /// The layers each node would hold of `base_shard`'s model for a request started here now:
    /// `(node_id, start_layer, end_layer, memory_bytes)` in ring order, `memory_bytes` being
    /// what they need there (`None` when the engine cannot tell); raises
    /// `InsufficientMemoryError` when the model does not fit the nodes' memory.
    fn layer_plan<'py>(&self, py: Python<'py>, base_shard: PyShard) -> PyResult<Bound<'py, PyAny>> {
        let node = self.inner.clone();
        super::asyncio::future_into_py(py, async move {
            let plan = node.layer_plan(&base_shard.inner).await?;
            Ok(plan
                .into_iter()
                .map(|l| (l.node_id, l.start_layer, l.end_layer, l.memory))
                .collect::<Vec<_>>())
        })
    }

    /// Starts a request from a prompt; resolves to its id once this node's first step is done.
    #[pyo3(signature = (base_shard, prompt, request_id=None, inference_state=None))]
    fn process_prompt<'py>(
        &self,
        py: Python<'py>,
        base_shard: PyShard,
        prompt: String,
        request_id: Option<String>,
        inference_state: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (node, state) = (self.inner.clone(), state_from_py(inference_state)?);
        super::asyncio::future_into_py(py, async move {
            Ok(node.process_prompt(&base_shard.inner, &prompt, request_id, state).await?)
        })
    }

    /// Runs this node's shard of `base_shard` on `tensor` for a running request.
    #[pyo3(signature = (base_shard, tensor, request_id=None, inference_state=None))]
    fn process_tensor<'py>(
        &self,
        py: Python<'py>,
        base_shard: PyShard,
        tensor: &Bound<'py, PyAny>,
        request_id: Option<String>,
        inference_state: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (node, tensor, state) =
            (self.inner.clone(), wire_from_ndarray(tensor)?, state_from_py(inference_state)?);
        super::asyncio::future_into_py(py, async move {
            Ok(node.process_tensor(&base_shard.inner, tensor, request_id, state).await?)
        })
    }

    /// Runs one batch of `base_shard`'s model through the ring from the node holding its first
    /// layer; resolves to the batch's mean loss over the positions that count.
    #[pyo3(signature = (base_shard, example, target, length, train=false, request_id=None))]
    #[allow(clippy::too_many_arguments)]
    fn enqueue_example<'py>(
        &self,
        py: Python<'py>,
        base_shard: PyShard,
        example: &Bound<'py, PyAny>,
        target: &Bound<'py, PyAny>,
        length: &Bound<'py, PyAny>,
        train: bool,
        request_id: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (node, example) = (self.inner.clone(), example_from_py(example, target, length)?);
        super::asyncio::future_into_py(py, async move {
            Ok(node.enqueue_example(&base_shard.inner, example, train, request_id).await?.loss)
        })
    }

    /// Runs this node's `shard` over an example, then the ring after it; resolves to the loss,
    /// or `(loss, grads)` when a gradient for the shard's input came back.
    #[pyo3(signature = (shard, example, target, length, train=false, request_id=None))]
    #[allow(clippy::too_many_arguments)]
    fn process_example<'py>(
        &self,
        py: Python<'py>,
        shard: PyShard,
        example: &Bound<'py, PyAny>,
        target: &Bound<'py, PyAny>,
        length: &Bound<'py, PyAny>,
        train: bool,
        request_id: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (node, example) = (self.inner.clone(), example_from_py(example, target, length)?);
        let request_id = request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        super::asyncio::future_into_py(py, async move {
            Ok(LossReply(node.process_example(&shard.inner, example, train, &request_id).await?))
        })
    }

    /// Starts a request and returns the async iterator of its tokens at once; `images` are
    /// the prompt's preprocessed images (`[n, channels, height, width]` float32) for a vision model.
    #[pyo3(signature = (base_shard, prompt, request_id=None, *, max_tokens=None, temperature=None, top_p=None, top_k=None, seed=None, images=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        base_shard: PyShard,
        prompt: String,
        request_id: Option<String>,
        max_tokens: Option<usize>,
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<usize>,
        seed: Option<u64>,
        images: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyTokenStream> {
        super::asyncio::remember_running_loop(py);
        let images = images.filter(|i| !i.is_none()).map(wire_from_ndarray).transpose()?;
        let options = GenerateOptions { max_tokens, temperature, top_p, top_k, seed, images };
        let _runtime = pyo3_async_runtimes::tokio::get_runtime().enter();
        let (request_id, receiver) = self.inner.generate(&base_shard.inner, &prompt, request_id, options)?;
        Ok(PyTokenStream {
            request_id,
            node: self.inner.clone(),
            receiver: Arc::new(Mutex::new(receiver)),
            ended: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Stops a request on every node of the ring.
    fn cancel_request<'py>(&self, py: Python<'py>, request_id: String) -> PyResult<Bound<'py, PyAny>> {
        let node = self.inner.clone();
        super::asyncio::future_into_py(py, async move {
            node.cancel_request(&request_id).await;
            Ok(())
        })
    }

    /// Refreshes the peers from discovery; resolves to whether they changed.
    #[pyo3(signature = (wait_for_peers=0))]
    fn update_peers<'py>(&self, py: Python<'py>, wait_for_peers: usize) -> PyResult<Bound<'py, PyAny>> {
        let node = self.inner.clone();
        super::asyncio::future_into_py(py, async move { Ok(node.update_peers(wait_for_peers).await?) })
    }

    /// Rebuilds the topology, walking peers not in `visited` down to `max_depth`.
    #[pyo3(signature = (visited, max_depth=4))]
    fn collect_topology<'py>(
        &self,
        py: Python<'py>,
        visited: BTreeSet<String>,
        max_depth: i32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let node = self.inner.clone();
        super::asyncio::future_into_py(py, async move {
            Ok(PyTopology { inner: node.collect_topology(visited, max_depth).await })
        })
    }

    /// Sends a JSON status to every peer and to this node's listeners.
    fn broadcast_opaque_status<'py>(
        &self,
        py: Python<'py>,
        request_id: String,
        status: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        // The first message to a peer starts its delivery task, which needs the runtime; the
        // caller is a Python thread outside it.
        let _runtime = pyo3_async_runtimes::tokio::get_runtime().enter();
        self.inner.broadcast_opaque_status(&request_id, &status);
        super::asyncio::future_into_py(py, async { Ok(()) })
    }

    /// Sends tokens of a request to every peer.
    fn broadcast_result<'py>(
        &self,
        py: Python<'py>,
        request_id: String,
        result: Vec<u32>,
        is_finished: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _runtime = pyo3_async_runtimes::tokio::get_runtime().enter();
        self.inner.broadcast_result(&request_id, &result, is_finished);
        super::asyncio::future_into_py(py, async { Ok(()) })
    }

    /// Waits for the next events and resolves to all that are queued (at most 256):
    /// `("token", request_id, tokens, is_finished)`, `("status", request_id, status)`,
    /// `("failed", request_id, error)`.
    fn next_events<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let events = self.events.clone();
        super::asyncio::future_into_py(py, async move {
            let mut receiver = events.lock().await;
            let mut batch = Vec::new();
            if let Some(event) = receiver.recv().await {
                batch.push(event);
            }
            while batch.len() < EVENT_BATCH {
                match receiver.try_recv() {
                    Ok(event) => batch.push(event),
                    Err(_) => break,
                }
            }
            Ok(Events(batch))
        })
    }
}

/// Node events handed to Python as tuples.
struct Events(Vec<NodeEvent>);

impl<'py> IntoPyObject<'py> for Events {
    type Target = PyList;
    type Output = Bound<'py, PyList>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Self::Output> {
        let items = self
            .0
            .into_iter()
            .map(|event| match event {
                NodeEvent::Token { request_id, tokens, is_finished } => {
                    ("token", request_id, tokens, is_finished).into_pyobject(py).map(Bound::into_any)
                }
                NodeEvent::Status { request_id, status } => {
                    ("status", request_id, status).into_pyobject(py).map(Bound::into_any)
                }
                NodeEvent::Failed { request_id, error } => {
                    ("failed", request_id, error.to_string()).into_pyobject(py).map(Bound::into_any)
                }
            })
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }
}

/// The tokens of one request as they are generated: `async for token in stream`. It ends
/// when generation ends and, when the request fails, raises the exception of the error's kind
/// where it was raised (e.g. `ContextOverflowError` from another node's engine);
/// `await stream.aclose()` cancels the request on every node.
#[pyclass(name = "TokenStream", module = "exo.orchestration.node", frozen)]
pub struct PyTokenStream {
    request_id: String,
    node: Arc<Node>,
    receiver: Arc<Mutex<UnboundedReceiver<StreamEvent>>>,
    ended: Arc<AtomicBool>,
}

#[pymethods]
impl PyTokenStream {
    /// The request's id.
    #[getter]
    fn request_id(&self) -> &str {
        &self.request_id
    }

    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (receiver, ended) = (self.receiver.clone(), self.ended.clone());
        super::asyncio::future_into_py(py, async move {
            let event = receiver.lock().await.recv().await;
            match event {
                Some(StreamEvent::Token(token)) => Ok(token),
                Some(StreamEvent::Failed(error)) => {
                    ended.store(true, Ordering::SeqCst);
                    Err(PyErr::from(&*error))
                }
                Some(StreamEvent::Finished) | None => {
                    ended.store(true, Ordering::SeqCst);
                    Err(PyStopAsyncIteration::new_err(()))
                }
            }
        })
    }

    /// Cancels the request on every node unless it already ended.
    fn aclose<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (node, id, ended) = (self.node.clone(), self.request_id.clone(), self.ended.clone());
        super::asyncio::future_into_py(py, async move {
            if !ended.swap(true, Ordering::SeqCst) {
                node.cancel_request(&id).await;
            }
            Ok(())
        })
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyNode>()?;
    m.add_class::<PyTokenStream>()?;
    Ok(())
}
