//! A Python object standing in for the node a gRPC server serves, as exo classic's tests pass
//! a mock `Node` to `GRPCServer`: calls arrive as classic's server made them.

use std::collections::BTreeSet;

use async_trait::async_trait;
use pyo3::prelude::*;

use super::asyncio::{call_coroutine, with_python};
use super::convert::{prompt_args, tensor_args};
use super::gc::HoldsPython;
use super::topology::PyTopology;
use crate::engine::InferenceState;
use crate::error::{Error, Result};
use crate::net::RequestHandler;
use crate::shard::Shard;
use crate::tensor::WireTensor;
use crate::topology::Topology;

/// An object with classic's node methods: `process_prompt` and `process_tensor` coroutines,
/// `on_token` and `on_opaque_status` callback systems and `current_topology`.
pub struct PythonNode {
    object: Py<PyAny>,
}

impl PythonNode {
    /// Wraps `object`, which must at least have `process_prompt` and `process_tensor`.
    pub fn new(object: &Bound<'_, PyAny>) -> PyResult<Self> {
        for method in ["process_prompt", "process_tensor"] {
            if !object.hasattr(method)? {
                return Err(Error::InvalidArgument(format!(
                    "a node needs a {method}() method (or pass an exo.orchestration.node.Node)"
                ))
                .into());
            }
        }
        Ok(Self { object: object.clone().unbind() })
    }

    /// Calls `callbacks.trigger_all(*args)` for the callback system attribute `callbacks`.
    fn trigger_all<A>(&self, callbacks: &str, args: A)
    where
        A: for<'py> pyo3::call::PyCallArgs<'py>,
    {
        let triggered = with_python(|py| {
            self.object.bind(py).getattr(callbacks)?.call_method1("trigger_all", args)?;
            Ok(())
        });
        if let Err(error) = triggered {
            log::warn!("{callbacks}.trigger_all() of the Python node failed: {error}");
        }
    }
}

impl HoldsPython for PythonNode {
    fn python_object(&self) -> &Py<PyAny> {
        &self.object
    }
}

#[async_trait]
impl RequestHandler for PythonNode {
    async fn handle_prompt(
        &self,
        shard: Shard,
        prompt: String,
        request_id: Option<String>,
        state: Option<InferenceState>,
    ) -> Result<()> {
        let args = prompt_args(shard, prompt, request_id, state)?;
        call_coroutine(&self.object, "process_prompt", args).await.map(|_| ())
    }

    async fn handle_tensor(
        &self,
        shard: Shard,
        tensor: WireTensor,
        request_id: Option<String>,
        state: Option<InferenceState>,
    ) -> Result<()> {
        let args = tensor_args(shard, tensor, request_id, state)?;
        call_coroutine(&self.object, "process_tensor", args).await.map(|_| ())
    }

    async fn handle_result(&self, request_id: String, tokens: Vec<u32>, is_finished: bool) {
        self.trigger_all("on_token", (request_id, tokens, is_finished));
    }

    async fn handle_opaque_status(&self, request_id: String, status: String) {
        self.trigger_all("on_opaque_status", (request_id, status));
    }

    /// Classic's server answers with the node's `current_topology`.
    async fn handle_collect_topology(&self, _visited: BTreeSet<String>, _max_depth: i32) -> Result<Topology> {
        with_python(|py| Ok(self.object.bind(py).getattr("current_topology")?.extract::<PyTopology>()?.inner))
            .map_err(|e| Error::StandIn(format!("current_topology of the Python node: {e}")))
    }
}
