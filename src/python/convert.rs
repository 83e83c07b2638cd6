//! Classic's call arguments between Python and the core: inference states as classic's dicts,
//! and the argument tuples of the forward calls (`send_prompt`/`process_prompt`,
//! `send_tensor`/`process_tensor`) that stand-ins are called with.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::asyncio::with_python;
use super::shard::PyShard;
use super::tensor::{ndarray_from_wire, wire_from_ndarray};
use crate::engine::InferenceState;
use crate::error::{Error, Result};
use crate::shard::Shard;
use crate::tensor::WireTensor;

/// An inference state handed to Python as classic's dict: arrays, lists of arrays, and the
/// JSON values of everything else.
pub struct StateDict(pub Option<InferenceState>);

impl<'py> IntoPyObject<'py> for StateDict {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Self::Output> {
        let Some(state) = self.0 else { return Ok(py.None().into_bound(py)) };
        let dict = PyDict::new(py);
        for (key, tensor) in state.tensors {
            dict.set_item(key, ndarray_from_wire(py, tensor)?)?;
        }
        for (key, tensors) in state.tensor_lists {
            let arrays =
                tensors.into_iter().map(|t| ndarray_from_wire(py, t)).collect::<PyResult<Vec<_>>>()?;
            dict.set_item(key, PyList::new(py, arrays)?)?;
        }
        let json = py.import("json")?;
        for (key, value) in state.other {
            dict.set_item(key, json.call_method1("loads", (value.to_string(),))?)?;
        }
        Ok(dict.into_any())
    }
}

/// Reads classic's state dict: numpy arrays and lists of them become tensors, every other
/// value must be JSON-serializable.
pub fn state_from_py(state: Option<&Bound<'_, PyAny>>) -> PyResult<Option<InferenceState>> {
    let Some(state) = state.filter(|s| !s.is_none()) else { return Ok(None) };
    let dict = state.cast::<PyDict>()?;
    let numpy = state.py().import("numpy")?;
    let ndarray = numpy.getattr("ndarray")?;
    let json = state.py().import("json")?;
    let mut out = InferenceState::default();
    for (key, value) in dict.iter() {
        let key: String = key.extract()?;
        if value.is_instance(&ndarray)? {
            out.tensors.insert(key, wire_from_ndarray(&value)?);
            continue;
        }
        if let Ok(list) = value.cast::<PyList>() {
            if !list.is_empty() && list.iter().all(|v| v.is_instance(&ndarray).unwrap_or(false)) {
                let tensors = list.iter().map(|v| wire_from_ndarray(&v)).collect::<PyResult<Vec<_>>>()?;
                out.tensor_lists.insert(key, tensors);
                continue;
            }
        }
        let text: String = json.call_method1("dumps", (&value,))?.extract()?;
        let parsed = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidArgument(format!("inference_state[{key:?}]: {e}")))?;
        out.other.insert(key, parsed);
    }
    Ok(Some(out))
}

/// A forward call's Python arguments: shard, prompt or tensor, request id, inference state.
pub type ForwardArgs<T> = (PyShard, T, Option<String>, Py<PyAny>);

/// Python arguments `(shard, prompt, request_id, inference_state)`, in the order classic's
/// `send_prompt` and `process_prompt` take them.
pub fn prompt_args(
    shard: Shard,
    prompt: String,
    request_id: Option<String>,
    state: Option<InferenceState>,
) -> Result<ForwardArgs<String>> {
    with_python(|py| {
        Ok((PyShard { inner: shard }, prompt, request_id, StateDict(state).into_pyobject(py)?.unbind()))
    })
    .map_err(|e| Error::StandIn(e.to_string()))
}

/// Python arguments `(shard, tensor, request_id, inference_state)`, the tensor as an ndarray,
/// in the order classic's `send_tensor` and `process_tensor` take them.
pub fn tensor_args(
    shard: Shard,
    tensor: WireTensor,
    request_id: Option<String>,
    state: Option<InferenceState>,
) -> Result<ForwardArgs<Py<PyAny>>> {
    with_python(|py| {
        let tensor = ndarray_from_wire(py, tensor)?.unbind();
        Ok((PyShard { inner: shard }, tensor, request_id, StateDict(state).into_pyobject(py)?.unbind()))
    })
    .map_err(|e| Error::StandIn(e.to_string()))
}
