//! Servers for Python: classic's `GRPCServer`, the native request-handler base class it serves
//! as is, and an adapter that lets a Python object with `start`/`stop` stand in for a server.

use std::sync::Arc;

use async_trait::async_trait;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::PyTraverseError;

use super::asyncio::call_coroutine;
use super::gc::{FromPy, HoldsPython, StandIns};
use super::node_stand_in::PythonNode;
use crate::error::{Error, Result};
use crate::net::cluster_key::ClusterKey;
use crate::net::grpc::GrpcServer;
use crate::net::{RequestHandler, Server};

/// What a server serves natively (`exo.networking.server`): the base class of every Rust
/// request handler (the node's native core), so the server needs no Python adapter for it.
#[pyclass(name = "NativeRequestHandler", module = "exo.networking.server", subclass, frozen)]
pub struct PyRequestHandler {
    pub inner: Arc<dyn RequestHandler>,
}

/// exo classic's `GRPCServer(node, host, port)`: serves the node's `NodeService`; with a
/// `cluster_key`, only to calls that prove it.
#[pyclass(name = "GRPCServer", module = "exo.networking.grpc.grpc_server", frozen)]
pub struct PyGrpcServer {
    pub inner: Arc<GrpcServer>,
    /// A Python stand-in node, kept alive here (the server holds its node weakly) and shown
    /// to the garbage collector, so a node that holds its own server is still collected.
    stand_ins: StandIns,
}

#[pymethods]
impl PyGrpcServer {
    /// `node` is a native request handler, an object whose `_core` is one (an
    /// `exo.orchestration.node.Node`), or any object with classic's node methods (a test's
    /// mock node); port 0 picks a free one.
    #[new]
    #[pyo3(signature = (node, host, port, cluster_key=None))]
    fn new(node: &Bound<'_, PyAny>, host: String, port: u16, cluster_key: Option<&str>) -> PyResult<Self> {
        let key = cluster_key.map(ClusterKey::new).transpose()?;
        let native = node
            .cast::<PyRequestHandler>()
            .ok()
            .cloned()
            .or_else(|| node.getattr("_core").ok()?.cast_into::<PyRequestHandler>().ok());
        let (handler, stand_in): (Arc<dyn RequestHandler>, _) = match native {
            Some(core) => (core.get().inner.clone(), None),
            None => {
                let stand_in = Arc::new(PythonNode::new(node)?);
                (stand_in.clone(), Some(stand_in))
            }
        };
        let inner = Arc::new(GrpcServer::new(Arc::downgrade(&handler), host, port).with_cluster_key(key));
        let stand_ins = StandIns::default();
        stand_ins.set("node", stand_in.map(|node| node as Arc<dyn HoldsPython>));
        Ok(Self { inner, stand_ins })
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> std::result::Result<(), PyTraverseError> {
        self.stand_ins.visit(&visit)
    }

    fn __clear__(&self) {
        self.stand_ins.clear();
    }

    fn start<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        // A stand-in node's coroutines run on the loop the server was started from.
        super::asyncio::remember_running_loop(py);
        let server = self.inner.clone();
        super::asyncio::future_into_py(py, async move { Ok(server.start().await?) })
    }

    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let server = self.inner.clone();
        super::asyncio::future_into_py(py, async move { Ok(server.stop().await?) })
    }

    /// The host it listens on.
    #[getter]
    fn host(&self) -> String {
        self.inner.host().to_string()
    }

    /// The port it listens on (the chosen one once started with port 0).
    #[getter]
    fn port(&self) -> u16 {
        self.inner.port()
    }
}

/// A server from Python: a native gRPC server as is, any object with `start`/`stop` through
/// an adapter.
pub fn server_from_py(object: &Bound<'_, PyAny>) -> PyResult<FromPy<dyn Server>> {
    if let Ok(native) = object.cast::<PyGrpcServer>() {
        return Ok(FromPy::native(native.get().inner.clone()));
    }
    for method in ["start", "stop"] {
        if !object.hasattr(method)? {
            return Err(Error::InvalidArgument(format!("a server needs a {method}() method")).into());
        }
    }
    let stand_in = Arc::new(PythonServer { object: object.clone().unbind() });
    Ok(FromPy { core: stand_in.clone(), stand_in: Some(stand_in) })
}

/// A Python object with `start` and `stop` coroutines.
struct PythonServer {
    object: Py<PyAny>,
}

impl HoldsPython for PythonServer {
    fn python_object(&self) -> &Py<PyAny> {
        &self.object
    }
}

#[async_trait]
impl Server for PythonServer {
    async fn start(&self) -> Result<()> {
        call_coroutine(&self.object, "start", ()).await.map(|_| ())
    }

    async fn stop(&self) -> Result<()> {
        call_coroutine(&self.object, "stop", ()).await.map(|_| ())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRequestHandler>()?;
    m.add_class::<PyGrpcServer>()?;
    Ok(())
}
