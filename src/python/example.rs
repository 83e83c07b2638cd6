//! Examples between Python and the core: numpy arrays in (classic's `example`, `target`,
//! `length`), a loss out, with the input gradient as a numpy array when one came back.

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::tensor::{ndarray_from_wire, wire_from_ndarray};
use crate::engine::example::{Example, ExampleLoss};

/// An example from classic's three arrays.
pub fn example_from_py(
    example: &Bound<'_, PyAny>,
    target: &Bound<'_, PyAny>,
    length: &Bound<'_, PyAny>,
) -> PyResult<Example> {
    Ok(Example {
        input: wire_from_ndarray(example)?,
        target: wire_from_ndarray(target)?,
        lengths: wire_from_ndarray(length)?,
    })
}

/// A loss handed to Python as classic's peers return it: the float alone, or
/// `(loss, grads)` when a gradient came back.
pub struct LossReply(pub ExampleLoss);

impl<'py> IntoPyObject<'py> for LossReply {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Self::Output> {
        let loss = self.0.loss.into_pyobject(py)?.into_any();
        match self.0.grads {
            None => Ok(loss),
            Some(grads) => Ok(PyTuple::new(py, [loss, ndarray_from_wire(py, grads)?])?.into_any()),
        }
    }
}
