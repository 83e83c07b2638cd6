//! `x Wᵀ` and `g W` for a frozen weight kept as a quantized checkpoint stores it (GGUF blocks,
//! MLX's affine codes, blocks made by `--quantize`, and the float matrices such checkpoints
//! hold beside them), so that fine-tuning holds the weights in their quantized size, as QLoRA
//! does. The weight is the inference layer's own; each product dequantizes a chunk of its rows
//! at a time to f32 and multiplies that chunk, so at most one chunk's f32 values exist at once.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::frozen_product::FrozenProduct;
use super::linear::{HostMatrix, Linear};
use crate::engine::kernels::Orientation;
use crate::error::{Error, Result};

/// Values of one dequantized chunk of rows: 4 MiB of f32.
const CHUNK_VALUES: usize = 1 << 20;

/// Rows of a chunk are a multiple of this, so that whole chunks fit AMX's tiles.
const CHUNK_ROW_STEP: usize = 32;

/// Where the weight's rows are stored.
#[derive(Clone)]
enum Stored {
    /// In host memory, decoded row by row by the host kernels.
    Host(HostMatrix),
    /// A candle quantized tensor on the host (block types the host kernels do not multiply).
    Candle(Arc<QTensor>),
}

/// Rows `rows` of a quantized weight `[out, in]`, as the right operand of products.
#[derive(Clone)]
pub struct QuantizedProduct {
    stored: Stored,
    rows: Range<usize>,
    cols: usize,
}

impl QuantizedProduct {
    /// Products with rows `rows` of `layer`'s weight (one part of a stacked layer), shared with
    /// the layer; fails for a layer whose weight is not in host memory.
    pub fn of(layer: &Linear, rows: Range<usize>) -> Result<Self> {
        let outside = |total: usize| {
            Error::InvalidArgument(format!("rows {rows:?} are not one part of a weight of {total} rows"))
        };
        match layer {
            Linear::Host { weight, .. } if rows.end <= weight.rows() => {
                Ok(Self { stored: Stored::Host(weight.clone()), cols: weight.cols(), rows })
            }
            Linear::Quantized { weight, .. } if weight.device().is_cpu() => {
                let (total, cols) = weight.shape().dims2()?;
                if rows.end > total {
                    return Err(outside(total));
                }
                Ok(Self { stored: Stored::Candle(weight.clone()), cols, rows })
            }
            Linear::Split(parts) => {
                let mut start = 0;
                for part in parts {
                    let end = start + part.rows();
                    if start <= rows.start && rows.end <= end {
                        return Self::of(part, rows.start - start..rows.end - start);
                    }
                    start = end;
                }
                Err(outside(start))
            }
            Linear::Device { weight, .. } => Err(on_device(weight.device())),
            Linear::Quantized { weight, .. } => Err(on_device(&weight.device())),
            Linear::Host { weight, .. } => Err(outside(weight.rows())),
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `x Wᵀ` of the rows `x` (each `in` values): rows of `out` values, tracking nothing. Each
    /// chunk of the weight's rows gives its columns of the output.
    pub fn product(&self, x: &[f32]) -> candle_core::Result<Vec<f32>> {
        let (n, k) = (self.rows(), self.cols);
        let rows = rows_of(x, k)?;
        let mut out = vec![0f32; rows * n];
        for chunk in self.chunks() {
            let (start, width) = (chunk.start - self.rows.start, chunk.len());
            let part = multiply(x, self.dequantize(chunk)?, (width, k), Orientation::Transposed)?;
            for (row, values) in out.chunks_exact_mut(n).zip(part.chunks_exact(width)) {
                row[start..start + width].copy_from_slice(values);
            }
        }
        Ok(out)
    }

    /// `g W` of the rows `g` (each `out` values): the input's gradient given the output's, rows
    /// of `in` values, summed over chunks of the weight's rows.
    pub fn input_gradient(&self, g: &[f32]) -> candle_core::Result<Vec<f32>> {
        let (n, k) = (self.rows(), self.cols);
        let rows = rows_of(g, n)?;
        let mut out = vec![0f32; rows * k];
        for chunk in self.chunks() {
            let (start, width) = (chunk.start - self.rows.start, chunk.len());
            let columns: Vec<f32> =
                g.chunks_exact(n).flat_map(|row| &row[start..start + width]).copied().collect();
            let part = multiply(&columns, self.dequantize(chunk)?, (width, k), Orientation::AsStored)?;
            out.iter_mut().zip(part).for_each(|(sum, value)| *sum += value);
        }
        Ok(out)
    }

    /// The weight's rows in chunks of about [`CHUNK_VALUES`] values.
    fn chunks(&self) -> impl Iterator<Item = Range<usize>> {
        let step = (CHUNK_VALUES / self.cols.max(1) / CHUNK_ROW_STEP).max(1) * CHUNK_ROW_STEP;
        let Range { start, end } = self.rows;
        (start..end).step_by(step).map(move |first| first..(first + step).min(end))
    }

    /// Rows `rows` of the stored weight as f32, row after row.
    fn dequantize(&self, rows: Range<usize>) -> candle_core::Result<Vec<f32>> {
        let cols = self.cols;
        match &self.stored {
            Stored::Host(matrix) => {
                let mut values = vec![0f32; rows.len() * cols];
                values
                    .par_chunks_exact_mut(cols)
                    .zip(rows.into_par_iter())
                    .for_each(|(out, row)| matrix.row_f32(row, out));
                Ok(values)
            }
            Stored::Candle(weight) => {
                let dtype = weight.dtype();
                let row_bytes = cols / dtype.block_size() * dtype.type_size();
                let bytes = weight.data()?;
                let chunk = &bytes[rows.start * row_bytes..rows.end * row_bytes];
                let storage = QStorage::from_data(Cow::Borrowed(chunk), &Device::Cpu, dtype)?;
                QTensor::new(storage, (rows.len(), cols))?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()
            }
        }
    }
}

/// The refusal of a quantized weight held off the host.
fn on_device(device: &Device) -> Error {
    Error::InvalidModel(format!(
        "fine-tuning multiplies quantized weights on the host; this model's are on {:?} (load it on the CPU)",
        device.location()
    ))
}

/// The number of rows of `width` values in `x`.
fn rows_of(x: &[f32], width: usize) -> candle_core::Result<usize> {
    if width == 0 || !x.len().is_multiple_of(width) {
        candle_core::bail!("{} values are not rows of {width} for a product", x.len())
    }
    Ok(x.len() / width)
}

/// Rows `x` times the f32 chunk `w` (`[n, k]`) in `orientation`, as a float weight's frozen
/// product multiplies it.
fn multiply(
    x: &[f32],
    w: Vec<f32>,
    (n, k): (usize, usize),
    orientation: Orientation,
) -> candle_core::Result<Vec<f32>> {
    let chunk =
        FrozenProduct::new(Tensor::from_vec(w, (n, k), &Device::Cpu)?).map_err(candle_core::Error::wrap)?;
    match orientation {
        Orientation::Transposed => chunk.product(x),
        Orientation::AsStored => chunk.input_gradient(x),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;
    use candle_core::Var;

    use super::*;
    use crate::engine::candle::frozen_weight::FrozenWeight;
    use crate::engine::kernels::{AffineMatrix, BlockMatrix, BlockType, WeightDType, WeightMatrix};

    /// A `[rows, cols]` weight of smooth varied values, quantized by candle to `dtype`.
    fn quantized(rows: usize, cols: usize, dtype: GgmlDType) -> QTensor {
        let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect();
        let dense = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&dense, dtype).unwrap()
    }

    /// Holds the product and the input gradient of rows `rows` of `layer` to f64 sums over
    /// `reference` (the dequantized weight), within the split-f32 kernel's bound.
    fn check(layer: &Linear, rows: Range<usize>, reference: &Tensor, batch: usize) {
        let frozen = QuantizedProduct::of(layer, rows.clone()).unwrap();
        let (n, k) = (rows.len(), frozen.cols());
        let frozen = FrozenWeight::Quantized(frozen);
        let w: Vec<f32> =
            reference.narrow(0, rows.start, n).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let x = Tensor::randn(0f32, 1.0, (batch, 2, k), &Device::Cpu).unwrap();
        let upstream = Tensor::randn(0f32, 1.0, (batch, 2, n), &Device::Cpu).unwrap();
        let x = Var::from_tensor(&x).unwrap();
        let y = frozen.apply(x.as_tensor()).unwrap();
        let grads = (&y * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        let gradient = grads.get(x.as_tensor()).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (xs, gs) = (values(x.as_tensor()), values(&upstream));
        let (ys, dxs) = (values(&y), values(gradient));
        for r in 0..batch * 2 {
            for (j, &got) in ys[r * n..(r + 1) * n].iter().enumerate() {
                let terms = (0..k).map(|c| xs[r * k + c] as f64 * w[j * k + c] as f64);
                assert_close(got, terms, "product");
            }
            for (c, &got) in dxs[r * k..(r + 1) * k].iter().enumerate() {
                let terms = (0..n).map(|j| gs[r * n + j] as f64 * w[j * k + c] as f64);
                assert_close(got, terms, "gradient");
            }
        }
    }

    /// `got` within `Σ|term|·2⁻¹⁵` (the split kernel's bound, looser than f32's) of `Σ term`.
    fn assert_close(got: f32, terms: impl Iterator<Item = f64>, what: &str) {
        let (sum, magnitude) = terms.fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()));
        let bound = magnitude * 2f64.powi(-15) + 1e-6;
        assert!((got as f64 - sum).abs() <= bound, "{what}: {got} vs {sum} (bound {bound})");
    }

    fn host_blocks(weight: &QTensor, block_type: BlockType) -> Linear {
        let bytes = weight.data().unwrap().into_owned();
        let (rows, cols) = weight.shape().dims2().unwrap();
        let len = bytes.len();
        Linear::new(BlockMatrix::new(Arc::new(bytes), 0..len, rows, cols, block_type).unwrap(), None).unwrap()
    }

    #[test]
    fn host_blocks_equal_a_matmul_with_the_dequantized_weight() {
        // Whole AMX tiles (64 rows of 64, 16 input rows), a part of a stacked weight, and a
        // shape off the tiles (40 rows of 96, 3 input rows).
        for (rows, cols, batch, part) in [(96, 64, 8, 32..96), (40, 96, 1, 0..40)] {
            let weight = quantized(rows, cols, GgmlDType::Q8_0);
            let reference = weight.dequantize(&Device::Cpu).unwrap();
            check(&host_blocks(&weight, BlockType::Q8_0), part, &reference, batch);
        }
    }

    #[test]
    fn chunks_of_rows_add_up_to_the_whole_product() {
        // 4096 columns give chunks of 256 rows: two chunks, the second a part one.
        let weight = quantized(288, 4096, GgmlDType::Q8_0);
        let reference = weight.dequantize(&Device::Cpu).unwrap();
        let frozen = QuantizedProduct::of(&host_blocks(&weight, BlockType::Q8_0), 0..288).unwrap();
        assert_eq!(frozen.chunks().collect::<Vec<_>>(), [0..256, 256..288]);
        check(&host_blocks(&weight, BlockType::Q8_0), 0..288, &reference, 4);
    }

    #[test]
    fn candle_blocks_and_split_layers_equal_a_matmul_with_the_dequantized_weight() {
        let (first, second) = (quantized(32, 256, GgmlDType::Q4K), quantized(64, 256, GgmlDType::Q6K));
        let reference = Tensor::cat(
            &[first.dequantize(&Device::Cpu).unwrap(), second.dequantize(&Device::Cpu).unwrap()],
            0,
        )
        .unwrap();
        let layer = Linear::Split(vec![
            Linear::quantized(Arc::new(first), None).unwrap(),
            Linear::quantized(Arc::new(second), None).unwrap(),
        ]);
        check(&layer, 32..96, &reference, 8);
        check(&layer, 0..32, &reference, 1);
        let message = QuantizedProduct::of(&layer, 16..48).err().unwrap().to_string();
        assert!(message.contains("rows 16..48 are not one part of a weight of 96 rows"), "{message}");
    }

    #[test]
    fn affine_codes_equal_a_matmul_with_the_dequantized_weight() {
        // 64 rows of 128 4-bit codes in groups of 64, with f32 scales and biases.
        let (rows, cols, groups) = (64, 128, 2);
        let codes: Vec<u8> = (0..rows * cols / 2).map(|i| (i * 53 % 256) as u8).collect();
        let parameters = |scale: f32| {
            let values: Vec<u8> =
                (0..rows * groups).flat_map(|i| (scale * (1.0 + (i % 7) as f32)).to_le_bytes()).collect();
            let len = values.len();
            WeightMatrix::new(Arc::new(values), 0..len, rows, groups, WeightDType::F32).unwrap()
        };
        let len = codes.len();
        let matrix =
            AffineMatrix::new(Arc::new(codes), 0..len, parameters(0.01), parameters(-0.03), cols, 4).unwrap();
        let weight = HostMatrix::Affine(matrix);
        let mut values = vec![0f32; rows * cols];
        for (row, out) in values.chunks_exact_mut(cols).enumerate() {
            weight.row_f32(row, out);
        }
        let reference = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        check(&Linear::new(weight, None).unwrap(), 0..rows, &reference, 8);
    }

    #[test]
    fn a_float_matrix_of_a_quantized_checkpoint_equals_a_matmul() {
        // An f16 matrix, as a GGUF file may hold beside its blocks.
        let (rows, cols) = (32, 64);
        let values: Vec<half::f16> =
            (0..rows * cols).map(|i| half::f16::from_f32(((i * 29 % 61) as f32 - 30.0) / 32.0)).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let len = bytes.len();
        let matrix = WeightMatrix::new(Arc::new(bytes), 0..len, rows, cols, WeightDType::F16).unwrap();
        let widened: Vec<f32> = values.iter().map(|v| v.to_f32()).collect();
        let reference = Tensor::from_vec(widened, (rows, cols), &Device::Cpu).unwrap();
        check(&Linear::new(matrix, None).unwrap(), 0..rows, &reference, 8);
    }
}
