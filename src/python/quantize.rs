//! GGML quantization of f32 matrices and its inverse, for the test fixtures and fidelity tests.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::engine::candle::quant_type::{self, ggml_dtype_from_name};
use crate::error::Error;

/// Blocks of `ggml_type` holding `values` (`rows` × `cols` little-endian f32), row after row.
#[pyfunction]
fn quantize<'py>(
    py: Python<'py>,
    values: &[u8],
    rows: usize,
    cols: usize,
    ggml_type: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let dtype = ggml_dtype_from_name(ggml_type)?;
    if !values.len().is_multiple_of(4) {
        return Err(Error::InvalidTensor(format!("{} bytes are not whole f32 values", values.len())).into());
    }
    let data = py.detach(|| {
        let floats: Vec<f32> =
            values.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        quant_type::quantize(floats, rows, cols, dtype)
    })?;
    Ok(PyBytes::new(py, &data))
}

/// The `rows` × `cols` little-endian f32 values that `data`, `ggml_type` blocks, hold.
#[pyfunction]
fn dequantize<'py>(
    py: Python<'py>,
    data: &[u8],
    rows: usize,
    cols: usize,
    ggml_type: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let dtype = ggml_dtype_from_name(ggml_type)?;
    let bytes = py.detach(|| {
        let values = quant_type::dequantize(data, rows, cols, dtype)?;
        Ok::<_, Error>(values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
    })?;
    Ok(PyBytes::new(py, &bytes))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    Ok(())
}
