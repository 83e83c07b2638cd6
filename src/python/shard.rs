//! `Shard` and `shards_overlap`, as `exo.inference.shard` exposes them.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::error::Error;
use crate::shard::Shard;

/// A contiguous range of a model's layers (exo classic's frozen `Shard` dataclass).
#[pyclass(name = "Shard", module = "exo.inference.shard", frozen, eq, hash, from_py_object)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PyShard {
    pub inner: Shard,
}

#[pymethods]
impl PyShard {
    #[new]
    #[pyo3(signature = (model_id, start_layer, end_layer, n_layers))]
    fn new(model_id: String, start_layer: i32, end_layer: i32, n_layers: i32) -> Self {
        Self { inner: Shard::new(model_id, start_layer, end_layer, n_layers) }
    }

    #[getter]
    fn model_id(&self) -> &str {
        &self.inner.model_id
    }

    #[getter]
    fn start_layer(&self) -> i32 {
        self.inner.start_layer
    }

    #[getter]
    fn end_layer(&self) -> i32 {
        self.inner.end_layer
    }

    #[getter]
    fn n_layers(&self) -> i32 {
        self.inner.n_layers
    }

    fn is_first_layer(&self) -> bool {
        self.inner.is_first_layer()
    }

    fn is_last_layer(&self) -> bool {
        self.inner.is_last_layer()
    }

    fn get_layer_count(&self) -> i32 {
        self.inner.layer_count()
    }

    fn overlaps(&self, other: &PyShard) -> bool {
        self.inner.overlaps(&other.inner)
    }

    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        dict.set_item("model_id", &self.inner.model_id)?;
        dict.set_item("start_layer", self.inner.start_layer)?;
        dict.set_item("end_layer", self.inner.end_layer)?;
        dict.set_item("n_layers", self.inner.n_layers)?;
        Ok(dict)
    }

    /// Builds a shard from `to_dict()`'s output; a missing key is an error naming it.
    #[staticmethod]
    fn from_dict(data: &Bound<'_, PyAny>) -> PyResult<Self> {
        let field = |key: &str| {
            data.get_item(key).map_err(|_| Error::InvalidArgument(format!("shard dict has no {key:?} key")))
        };
        Ok(Self::new(
            field("model_id")?.extract()?,
            field("start_layer")?.extract()?,
            field("end_layer")?.extract()?,
            field("n_layers")?.extract()?,
        ))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let s = &self.inner;
        let model_id = s.model_id.as_str().into_pyobject(py)?.repr()?;
        Ok(format!(
            "Shard(model_id={model_id}, start_layer={}, end_layer={}, n_layers={})",
            s.start_layer, s.end_layer, s.n_layers
        ))
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let s = &slf.get().inner;
        let args = (s.model_id.clone(), s.start_layer, s.end_layer, s.n_layers).into_pyobject(slf.py())?;
        Ok((slf.get_type().into_any(), args))
    }
}

/// Whether two shards belong to the same model and share at least one layer.
#[pyfunction]
fn shards_overlap(shard1: &PyShard, shard2: &PyShard) -> bool {
    shard1.inner.overlaps(&shard2.inner)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyShard>()?;
    m.add_function(wrap_pyfunction!(shards_overlap, m)?)?;
    Ok(())
}
