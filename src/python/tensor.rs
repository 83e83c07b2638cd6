//! numpy arrays to and from wire tensors, one copy each way.

use numpy::{PyArray1, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::tensor::{DType, WireTensor};

/// A C-ordered little-endian copy of `array`'s elements as a validated wire tensor.
pub fn wire_from_ndarray(array: &Bound<'_, PyAny>) -> PyResult<WireTensor> {
    let py = array.py();
    let numpy = py.import("numpy")?;
    let array = numpy.call_method1("asarray", (array,))?;
    // Taken before `ascontiguousarray`, which turns a 0-d array into a 1-d one.
    let shape: Vec<usize> = array.getattr("shape")?.extract()?;
    let little_endian = array.getattr("dtype")?.call_method1("newbyteorder", ("<",))?;
    let contiguous = numpy.call_method1("ascontiguousarray", (array, little_endian))?;
    let contiguous = contiguous.cast_into::<PyUntypedArray>()?;
    let dtype = DType::from_name(&contiguous.dtype().getattr("name")?.extract::<String>()?)?;
    let bytes = contiguous.call_method1("reshape", (-1,))?.call_method1("view", ("uint8",))?;
    let data = bytes.cast_into::<PyArray1<u8>>()?.readonly().as_slice()?.to_vec();
    Ok(WireTensor::new(dtype, shape, data)?)
}

/// A numpy array owning the wire tensor's bytes (no copy), viewed as its dtype and shape.
pub fn ndarray_from_wire<'py>(py: Python<'py>, tensor: WireTensor) -> PyResult<Bound<'py, PyAny>> {
    let (dtype, shape, data) = tensor.into_parts();
    let bytes = PyArray1::from_vec(py, data);
    bytes.call_method1("view", (dtype.name(),))?.call_method1("reshape", (shape,))
}

/// Encodes an array for the wire: `(tensor_data, shape, dtype)` as exo's `Tensor` message holds them.
#[pyfunction]
fn ndarray_to_wire<'py>(
    py: Python<'py>,
    array: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyBytes>, Vec<usize>, &'static str)> {
    let (dtype, shape, data) = wire_from_ndarray(array)?.into_parts();
    Ok((PyBytes::new(py, &data), shape, dtype.name()))
}

/// Decodes a wire tensor; bytes that do not match shape × dtype raise `InvalidTensorError`.
#[pyfunction(name = "ndarray_from_wire")]
fn py_ndarray_from_wire<'py>(
    py: Python<'py>,
    tensor_data: Vec<u8>,
    shape: Vec<i64>,
    dtype: &str,
) -> PyResult<Bound<'py, PyAny>> {
    ndarray_from_wire(py, WireTensor::from_parts(dtype, &shape, tensor_data)?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(ndarray_to_wire, m)?)?;
    m.add_function(wrap_pyfunction!(py_ndarray_from_wire, m)?)?;
    Ok(())
}
