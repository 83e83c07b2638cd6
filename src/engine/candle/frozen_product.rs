//! Products with an f32 copy of a float checkpoint's frozen weight: split to bf16 parts for
//! AMX where this CPU has it, else candle's f32 matmul.

use std::sync::Arc;

use candle_core::{DType, Device, Storage, Tensor};

use crate::engine::kernels::{self, Orientation, SplitMatrix};
use crate::error::Result;

/// A frozen weight `[out, in]` on the host, as the right operand of products: split to bf16
/// parts for AMX ([`SplitMatrix`]) where this CPU has it and the shape is whole tiles, else an
/// f32 tensor for candle's matmul.
#[derive(Clone)]
pub enum FrozenProduct {
    /// Multiplied on AMX by [`kernels::split_product`].
    Split(Arc<SplitMatrix>),
    /// Multiplied by candle's f32 matmul.
    Dense(Tensor),
}

impl FrozenProduct {
    /// Products with `weight` (`[out, in]`, any float dtype; f32 products of its values).
    pub fn new(weight: Tensor) -> Result<Self> {
        let weight = weight.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
        let (rows, cols) = weight.dims2()?;
        let split = match (&*weight.storage_and_layout().0, weight.layout().contiguous_offsets()) {
            (Storage::Cpu(values), Some((start, end))) => {
                SplitMatrix::new(&values.as_slice::<f32>()?[start..end], (rows, cols))
            }
            _ => None,
        };
        Ok(match split {
            Some(split) => Self::Split(Arc::new(split)),
            None => Self::Dense(weight),
        })
    }

    /// Products with the row-major `[rows, cols]` weight stored as `bytes` of `dtype` (f32,
    /// bf16 or f16, little-endian), split from those bytes with no f32 copy of the whole.
    pub fn from_stored(bytes: &[u8], dtype: DType, (rows, cols): (usize, usize)) -> Result<Self> {
        let size = dtype.size_in_bytes();
        if bytes.len() != rows * cols * size || !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(crate::error::Error::InvalidModel(format!(
                "{} bytes of {dtype:?} are no [{rows}, {cols}] float weight",
                bytes.len()
            )));
        }
        let decode = |row: usize, out: &mut [f32]| {
            let values = bytes[row * cols * size..(row + 1) * cols * size].chunks_exact(size);
            for (out, value) in out.iter_mut().zip(values) {
                *out = match dtype {
                    DType::BF16 => half::bf16::from_le_bytes([value[0], value[1]]).to_f32(),
                    DType::F16 => half::f16::from_le_bytes([value[0], value[1]]).to_f32(),
                    _ => f32::from_le_bytes([value[0], value[1], value[2], value[3]]),
                };
            }
        };
        match SplitMatrix::from_rows((rows, cols), decode) {
            Some(split) => Ok(Self::Split(Arc::new(split))),
            None => Self::new(Tensor::from_raw_buffer(bytes, dtype, &[rows, cols], &Device::Cpu)?),
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Self::Split(w) => w.rows(),
            Self::Dense(w) => w.dim(0).unwrap_or(0),
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Self::Split(w) => w.cols(),
            Self::Dense(w) => w.dim(1).unwrap_or(0),
        }
    }

    /// `x Wᵀ` of the rows `x` (each `in` values): rows of `out` values, tracking nothing.
    pub fn product(&self, x: &[f32]) -> candle_core::Result<Vec<f32>> {
        self.rows_product(x, Orientation::Transposed)
    }

    /// `g W` of the rows `g` (each `out` values): the input's gradient given the output's, rows
    /// of `in` values.
    pub fn input_gradient(&self, g: &[f32]) -> candle_core::Result<Vec<f32>> {
        self.rows_product(g, Orientation::AsStored)
    }

    fn rows_product(&self, x: &[f32], orientation: Orientation) -> candle_core::Result<Vec<f32>> {
        let (inner, outer) = orientation.widths((self.rows(), self.cols()));
        if inner == 0 || !x.len().is_multiple_of(inner) {
            candle_core::bail!(
                "{} values are not rows of {inner} for a {}x{} weight",
                x.len(),
                self.rows(),
                self.cols()
            )
        }
        let rows = x.len() / inner;
        match self {
            Self::Split(w) => {
                let mut out = vec![0f32; rows * outer];
                if !kernels::split_product(x, w, orientation, &mut out) {
                    candle_core::bail!("{rows} rows do not meet a {}x{} weight", w.rows(), w.cols())
                }
                Ok(out)
            }
            Self::Dense(w) => {
                let x = Tensor::from_slice(x, (rows, inner), &Device::Cpu)?;
                let y = match orientation {
                    Orientation::Transposed => x.matmul(&w.t()?)?,
                    Orientation::AsStored => x.matmul(w)?,
                };
                y.flatten_all()?.to_vec1::<f32>()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;
    use crate::engine::candle::frozen_weight::FrozenWeight;

    /// For a weight candle multiplies (not whole tiles) and one split for AMX where the CPU has
    /// it (whole tiles, bf16 parts: within the kernels' bound, `Σ|x·w|·2⁻¹⁵`, about 1e-3 for
    /// sums of 64 such terms).
    #[test]
    fn the_product_and_the_input_gradient_equal_a_plain_matmul() {
        let device = Device::Cpu;
        for ((out, input), tolerance) in [((5, 3), 1e-6), ((64, 32), 1e-3)] {
            let weight = Tensor::randn(0f32, 1.0, (out, input), &device).unwrap();
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4, input), &device).unwrap()).unwrap();
            let frozen = FrozenProduct::new(weight.clone()).unwrap();
            let split =
                crate::engine::kernels::Isa::detect() == crate::engine::kernels::Isa::Amx && out == 64;
            assert_eq!(matches!(frozen, FrozenProduct::Split(_)), split, "{out}x{input}");
            let y = FrozenWeight::Float(frozen).apply(x.as_tensor()).unwrap();
            let expected = x.as_tensor().broadcast_matmul(&weight.t().unwrap()).unwrap();
            let difference = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!(difference(&y, &expected) < tolerance, "{out}x{input}: {}", difference(&y, &expected));
            // Any upstream gradient, not only ones.
            let upstream = Tensor::randn(0f32, 1.0, (2, 4, out), &device).unwrap();
            let grads = (y * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            let plain = (expected * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            let (grad, plain) = (grads.get(x.as_tensor()).unwrap(), plain.get(x.as_tensor()).unwrap());
            assert!(difference(grad, plain) < tolerance, "{out}x{input}: {}", difference(grad, plain));
        }
    }

    /// A weight taken from its stored bytes multiplies exactly as the same values given as a
    /// tensor, in each float dtype, split (whole tiles) or not; bytes that do not fit are refused.
    #[test]
    fn a_stored_weight_multiplies_as_its_tensor() {
        let device = Device::Cpu;
        for (out, input) in [(5, 3), (64, 32)] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let weight =
                    Tensor::randn(0f32, 1.0, (out, input), &device).unwrap().to_dtype(dtype).unwrap();
                // Each value is exact in `dtype`, so encoding it from f32 loses nothing.
                let values =
                    weight.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let bytes: Vec<u8> = values
                    .iter()
                    .flat_map(|&v| match dtype {
                        DType::F32 => v.to_le_bytes().to_vec(),
                        DType::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                        _ => half::f16::from_f32(v).to_le_bytes().to_vec(),
                    })
                    .collect();
                let stored = FrozenProduct::from_stored(&bytes, dtype, (out, input)).unwrap();
                let given = FrozenProduct::new(weight).unwrap();
                let x: Vec<f32> = (0..3 * input).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
                assert_eq!(
                    stored.product(&x).unwrap(),
                    given.product(&x).unwrap(),
                    "{dtype:?} {out}x{input}"
                );
                let g: Vec<f32> = (0..3 * out).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
                assert_eq!(stored.input_gradient(&g).unwrap(), given.input_gradient(&g).unwrap());
            }
        }
        let message = FrozenProduct::from_stored(&[0; 10], DType::F32, (2, 2)).err().unwrap().to_string();
        assert!(message.contains("10 bytes of F32 are no [2, 2] float weight"), "{message}");
    }
}
