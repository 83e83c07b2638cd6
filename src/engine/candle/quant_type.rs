//! GGML's tensor types by the names GGUF tools give them, and f32 matrices to and from their
//! blocks, row after row, as a GGUF file stores them (candle's quantizers and dequantizers).

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// Every type candle stores, by gguf-py's `GGMLQuantizationType` name.
const NAMES: [(&str, GgmlDType); 15] = [
    ("F32", GgmlDType::F32),
    ("F16", GgmlDType::F16),
    ("BF16", GgmlDType::BF16),
    ("Q4_0", GgmlDType::Q4_0),
    ("Q4_1", GgmlDType::Q4_1),
    ("Q5_0", GgmlDType::Q5_0),
    ("Q5_1", GgmlDType::Q5_1),
    ("Q8_0", GgmlDType::Q8_0),
    ("Q8_1", GgmlDType::Q8_1),
    ("Q2_K", GgmlDType::Q2K),
    ("Q3_K", GgmlDType::Q3K),
    ("Q4_K", GgmlDType::Q4K),
    ("Q5_K", GgmlDType::Q5K),
    ("Q6_K", GgmlDType::Q6K),
    ("Q8_K", GgmlDType::Q8K),
];

/// The type that `name` (gguf-py's spelling, any case: `q4_k`, `BF16`) names.
pub fn ggml_dtype_from_name(name: &str) -> Result<GgmlDType> {
    NAMES.iter().find(|(known, _)| known.eq_ignore_ascii_case(name)).map(|&(_, dtype)| dtype).ok_or_else(
        || {
            let known: Vec<&str> = NAMES.iter().map(|(known, _)| *known).collect();
            Error::InvalidArgument(format!("unknown GGML type {name:?} (known: {})", known.join(", ")))
        },
    )
}

/// gguf-py's name of `dtype`, e.g. `Q4_K`.
pub fn ggml_dtype_name(dtype: GgmlDType) -> &'static str {
    NAMES.iter().find(|(_, known)| *known == dtype).map(|(name, _)| *name).expect("every type is named")
}

/// Bytes of `rows` × `cols` values stored as `dtype`; `cols` must fill whole blocks.
fn stored_size(rows: usize, cols: usize, dtype: GgmlDType) -> Result<usize> {
    let block = dtype.block_size();
    if !cols.is_multiple_of(block) {
        return Err(Error::InvalidArgument(format!(
            "{cols} columns are not a multiple of {}'s block of {block} values",
            ggml_dtype_name(dtype)
        )));
    }
    Ok(rows * cols / block * dtype.type_size())
}

/// `values` (`rows` × `cols`, row-major) quantized to `dtype`'s blocks, row after row; taken by
/// value so that a large matrix is not copied again on its way into candle.
pub fn quantize(values: Vec<f32>, rows: usize, cols: usize, dtype: GgmlDType) -> Result<Vec<u8>> {
    stored_size(rows, cols, dtype)?;
    if values.len() != rows * cols {
        return Err(Error::InvalidTensor(format!("{} values for a {rows} x {cols} matrix", values.len())));
    }
    let matrix = Tensor::from_vec(values, (rows, cols), &Device::Cpu)?;
    Ok(QTensor::quantize(&matrix, dtype)?.data()?.into_owned())
}

/// The `rows` × `cols` f32 values (row-major) that `data`, `dtype` blocks row after row, hold.
pub fn dequantize(data: &[u8], rows: usize, cols: usize, dtype: GgmlDType) -> Result<Vec<f32>> {
    let size = stored_size(rows, cols, dtype)?;
    if data.len() != size {
        return Err(Error::InvalidTensor(format!(
            "{} bytes for a {rows} x {cols} {} matrix, which takes {size}",
            data.len(),
            ggml_dtype_name(dtype)
        )));
    }
    // candle reads the blocks in place, so they must sit at the alignment of their widest
    // field (an f32 scale at most): a copy into u32 words guarantees it.
    let mut words = vec![0u32; size.div_ceil(4)];
    let aligned = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..size];
    aligned.copy_from_slice(data);
    let storage = QStorage::from_data(Cow::Borrowed(aligned), &Device::Cpu, dtype)?;
    let matrix = QTensor::new(storage, (rows, cols))?.dequantize(&Device::Cpu)?;
    Ok(matrix.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_in_any_case() {
        for (name, dtype) in NAMES {
            assert_eq!(ggml_dtype_from_name(&name.to_lowercase()).unwrap(), dtype);
            assert_eq!(ggml_dtype_name(dtype), name);
        }
        let error = ggml_dtype_from_name("q4_k_m").unwrap_err().to_string();
        assert!(error.contains("\"q4_k_m\"") && error.contains("Q6_K"), "{error}");
    }

    #[test]
    fn q8_0_round_trips_within_its_step() {
        let values: Vec<f32> = (0..128).map(|i| (i as f32 - 64.0) / 10.0).collect();
        let data = quantize(values.clone(), 2, 64, GgmlDType::Q8_0).unwrap();
        // Two rows of two 34-byte blocks (an f16 scale and 32 signed bytes).
        assert_eq!(data.len(), 2 * 2 * 34);
        let back = dequantize(&data, 2, 64, GgmlDType::Q8_0).unwrap();
        for (a, b) in values.iter().zip(&back) {
            assert!((a - b).abs() <= 6.4 / 127.0, "{a} vs {b}");
        }
    }

    #[test]
    fn shapes_and_lengths_are_checked() {
        let error = quantize(vec![0.0; 100], 1, 100, GgmlDType::Q4K).unwrap_err().to_string();
        assert!(error.contains("100 columns") && error.contains("Q4_K") && error.contains("256"), "{error}");
        let error = quantize(vec![0.0; 31], 1, 32, GgmlDType::Q4_0).unwrap_err().to_string();
        assert!(error.contains("31 values"), "{error}");
        let error = dequantize(&[0; 17], 1, 32, GgmlDType::Q4_0).unwrap_err().to_string();
        assert!(error.contains("17 bytes") && error.contains("takes 18"), "{error}");
    }
}
