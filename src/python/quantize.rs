//! GGML quantization of f32 matrices and its inverse, and MLX's affine dequantization and
//! product as the engine computes them, for the test fixtures and fidelity tests.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::engine::candle::quant_type::{self, ggml_dtype_from_name};
use crate::engine::kernels::{dequantize_affine_row, linear_affine, AffineMatrix, WeightDType, WeightMatrix};
use crate::error::{Error, Result};

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
        Ok::<_, Error>(f32_bytes(&values))
    })?;
    Ok(PyBytes::new(py, &bytes))
}

/// An MLX-quantized `[rows, cols]` matrix from its packed codes and its scales and biases
/// (`dtype`: `f32`, `f16` or `bf16`, little-endian).
#[allow(clippy::too_many_arguments)]
fn affine_matrix(
    weight: &[u8],
    scales: &[u8],
    biases: &[u8],
    rows: usize,
    cols: usize,
    bits: usize,
    group_size: usize,
    dtype: &str,
) -> Result<AffineMatrix> {
    let dtype = match dtype.to_ascii_lowercase().as_str() {
        "f32" | "float32" => WeightDType::F32,
        "f16" | "float16" => WeightDType::F16,
        "bf16" | "bfloat16" => WeightDType::BF16,
        other => return Err(Error::InvalidArgument(format!("scales of dtype {other:?} (f32, f16 or bf16)"))),
    };
    if group_size == 0 || !cols.is_multiple_of(group_size) {
        return Err(Error::InvalidArgument(format!("groups of {group_size} do not divide {cols} columns")));
    }
    let parameters = |bytes: &[u8]| {
        let len = bytes.len();
        WeightMatrix::new(Arc::new(bytes.to_vec()), 0..len, rows, cols / group_size, dtype)
    };
    let codes = weight.to_vec();
    let len = codes.len();
    AffineMatrix::new(Arc::new(codes), 0..len, parameters(scales)?, parameters(biases)?, cols, bits)
}

/// Little-endian bytes of f32 `values`.
fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The `rows` × `cols` little-endian f32 weights that MLX's `mx.quantize` output holds:
/// `weight` (packed `bits` a weight), `scales` and `biases` (one per `group_size` weights, of
/// `dtype`), as the engine decodes them.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn mlx_dequantize<'py>(
    py: Python<'py>,
    weight: &[u8],
    scales: &[u8],
    biases: &[u8],
    rows: usize,
    cols: usize,
    bits: usize,
    group_size: usize,
    dtype: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let matrix = affine_matrix(weight, scales, biases, rows, cols, bits, group_size, dtype)?;
    let values = py.detach(|| {
        let mut values = vec![0f32; rows * cols];
        for (row, out) in values.chunks_exact_mut(cols).enumerate() {
            dequantize_affine_row(&matrix, row, out);
        }
        f32_bytes(&values)
    });
    Ok(PyBytes::new(py, &values))
}

/// `x Wᵀ` (`x`: little-endian f32, rows of `cols`) for the MLX-quantized `W` described as in
/// `mlx_dequantize`, by the engine's kernels: f32 `[x rows, rows]`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn mlx_quantized_matmul<'py>(
    py: Python<'py>,
    x: &[u8],
    weight: &[u8],
    scales: &[u8],
    biases: &[u8],
    rows: usize,
    cols: usize,
    bits: usize,
    group_size: usize,
    dtype: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let matrix = affine_matrix(weight, scales, biases, rows, cols, bits, group_size, dtype)?;
    if !x.len().is_multiple_of(4 * cols) {
        return Err(
            Error::InvalidArgument(format!("{} bytes are not rows of {cols} f32 values", x.len())).into()
        );
    }
    let output = py.detach(|| {
        let inputs: Vec<f32> =
            x.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let mut output = vec![0f32; inputs.len() / cols * rows];
        linear_affine(&inputs, &matrix, None, &mut output)?;
        Ok::<_, Error>(f32_bytes(&output))
    })?;
    Ok(PyBytes::new(py, &output))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(mlx_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(mlx_quantized_matmul, m)?)?;
    Ok(())
}
