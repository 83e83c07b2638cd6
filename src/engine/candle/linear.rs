//! A linear layer `y = x Wᵀ + b` whose weight stays in its checkpoint dtype: on the host it is
//! read by the SIMD kernels straight from memory, on an accelerator it is a device tensor
//! multiplied by candle (cuBLAS on CUDA). Several layers that share an input (q/k/v, gate/up)
//! can be one stacked layer whose output is split into their parts. Quantized weights (GGUF
//! blocks, MLX's affine codes) are read in place by the host kernels; GGUF blocks the host
//! kernels do not multiply go to candle's quantized kernels on either device.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Tensor};

use crate::engine::kernels::{self, AffineMatrix, BlockMatrix, WeightMatrix};
use crate::error::{Error, Result};

/// A weight in host memory that the SIMD kernels multiply.
#[derive(Debug, Clone)]
pub enum HostMatrix {
    /// f32, bf16 or f16 elements.
    Dense(WeightMatrix),
    /// GGUF blocks (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K).
    Blocks(BlockMatrix),
    /// MLX's affine-quantized codes with their group scales and biases.
    Affine(AffineMatrix),
}

impl HostMatrix {
    /// Output features.
    pub(super) fn rows(&self) -> usize {
        match self {
            Self::Dense(w) => w.rows(),
            Self::Blocks(w) => w.rows(),
            Self::Affine(w) => w.rows(),
        }
    }

    /// Input features.
    pub(super) fn cols(&self) -> usize {
        match self {
            Self::Dense(w) => w.cols(),
            Self::Blocks(w) => w.cols(),
            Self::Affine(w) => w.cols(),
        }
    }

    /// Row `row` widened or dequantized to f32 (`out` has `cols` values).
    pub(super) fn row_f32(&self, row: usize, out: &mut [f32]) {
        match self {
            Self::Dense(w) => w.row_f32(row, out),
            Self::Blocks(w) => kernels::dequantize_row(w, row, out),
            Self::Affine(w) => kernels::dequantize_affine_row(w, row, out),
        }
    }
}

/// Weight `[out_features, in_features]` in the checkpoint's dtype; bias in f32.
#[derive(Debug, Clone)]
pub enum Linear {
    /// In host memory, multiplied by the SIMD kernels.
    Host { weight: HostMatrix, bias: Option<Vec<f32>> },
    /// On an accelerator, multiplied by candle; activations are cast to the weight's dtype
    /// for the product (accumulated in f32 by cuBLAS) and back to f32 after it.
    Device { weight: Tensor, bias: Option<Tensor> },
    /// Quantized blocks `[out, in]` on the compute device, multiplied by candle's quantized
    /// matrix product (activations are quantized per block as llama.cpp does).
    Quantized { weight: Arc<QTensor>, bias: Option<Tensor> },
    /// Stacked layers whose weights could not be one matrix (their stored types differ),
    /// applied one after another; outputs follow in order.
    Split(Vec<Linear>),
}

impl Linear {
    /// A host layer over `weight` (`[out, in]`) and an optional bias of `out` values.
    pub fn new(weight: impl Into<HostMatrix>, bias: Option<Vec<f32>>) -> Result<Self> {
        let weight = weight.into();
        check_bias(bias.as_ref().map(Vec::len), weight.rows())?;
        Ok(Self::Host { weight, bias })
    }

    /// A device layer over `weight` (`[out, in]`) and an optional f32 bias `[out]`, both on
    /// the same device.
    pub fn on_device(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out, _) = weight.dims2()?;
        check_bias(bias.as_ref().map(Tensor::elem_count), out)?;
        Ok(Self::Device { weight, bias })
    }

    /// A quantized layer over `weight` (`[out, in]`) and an optional f32 bias `[out]`, both
    /// on the same device.
    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let (out, _) = weight.shape().dims2()?;
        check_bias(bias.as_ref().map(Tensor::elem_count), out)?;
        Ok(Self::Quantized { weight, bias })
    }

    /// Output features.
    pub(super) fn rows(&self) -> usize {
        match self {
            Self::Host { weight, .. } => weight.rows(),
            Self::Device { weight, .. } => weight.dim(0).expect("a device weight is 2-D"),
            Self::Quantized { weight, .. } => weight.shape().dims()[0],
            Self::Split(parts) => parts.iter().map(Linear::rows).sum(),
        }
    }

    /// Applies the layer to f32 activations `[.., in]`, returning f32 `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Host { weight, bias } => {
                let (dims, output) = host_product(weight, bias.as_deref(), x)?;
                Ok(Tensor::from_vec(output, dims, x.device())?)
            }
            Self::Device { weight, bias } => {
                let mut dims = x.dims().to_vec();
                let cols = *dims.last().expect("activations have a feature axis");
                let rows = x.elem_count() / cols.max(1);
                let input = x.reshape((rows, cols))?.to_dtype(weight.dtype())?;
                let mut output = input.matmul(&weight.t()?)?.to_dtype(DType::F32)?;
                if let Some(bias) = bias {
                    output = output.broadcast_add(bias)?;
                }
                *dims.last_mut().expect("activations have a feature axis") = weight.dim(0)?;
                Ok(output.reshape(dims)?)
            }
            Self::Quantized { weight, bias } => {
                let output = x.contiguous()?.apply_op1_no_bwd(weight.as_ref())?;
                Ok(match bias {
                    Some(bias) => output.broadcast_add(bias)?,
                    None => output,
                })
            }
            Self::Split(parts) => {
                let outputs = parts.iter().map(|part| part.forward(x)).collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&outputs, x.rank() - 1)?)
            }
        }
    }

    /// Applies the layer and splits its `[.., out]` output along the last axis into
    /// consecutive parts of `widths` (which sum to `out`), each its own contiguous tensor.
    pub fn forward_parts(&self, x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
        let out = self.rows();
        if widths.iter().sum::<usize>() != out {
            return Err(Error::InvalidArgument(format!("parts {widths:?} do not split {out} outputs")));
        }
        let mut start = 0;
        match self {
            Self::Host { weight, bias } => {
                let (mut dims, output) = host_product(weight, bias.as_deref(), x)?;
                widths
                    .iter()
                    .map(|&width| {
                        let part: Vec<f32> = output
                            .chunks_exact(out)
                            .flat_map(|row| &row[start..start + width])
                            .copied()
                            .collect();
                        start += width;
                        *dims.last_mut().expect("activations have a feature axis") = width;
                        Ok(Tensor::from_vec(part, dims.clone(), x.device())?)
                    })
                    .collect()
            }
            Self::Split(parts) if parts.iter().map(Linear::rows).eq(widths.iter().copied()) => {
                parts.iter().map(|part| part.forward(x)).collect()
            }
            Self::Device { .. } | Self::Quantized { .. } | Self::Split(_) => {
                let output = self.forward(x)?;
                let axis = output.rank() - 1;
                widths
                    .iter()
                    .map(|&width| {
                        let part = output.narrow(axis, start, width)?.contiguous()?;
                        start += width;
                        Ok(part)
                    })
                    .collect()
            }
        }
    }
}

impl From<WeightMatrix> for HostMatrix {
    fn from(weight: WeightMatrix) -> Self {
        Self::Dense(weight)
    }
}

impl From<BlockMatrix> for HostMatrix {
    fn from(weight: BlockMatrix) -> Self {
        Self::Blocks(weight)
    }
}

impl From<AffineMatrix> for HostMatrix {
    fn from(weight: AffineMatrix) -> Self {
        Self::Affine(weight)
    }
}

/// `x Wᵀ + b` by the host kernels: the output values and their dims.
fn host_product(weight: &HostMatrix, bias: Option<&[f32]>, x: &Tensor) -> Result<(Vec<usize>, Vec<f32>)> {
    let mut dims = x.dims().to_vec();
    let input: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut output = vec![0.0; input.len() / weight.cols() * weight.rows()];
    match weight {
        HostMatrix::Dense(weight) => kernels::linear(&input, weight, bias, &mut output)?,
        HostMatrix::Blocks(weight) => kernels::linear_blocks(&input, weight, bias, &mut output)?,
        HostMatrix::Affine(weight) => kernels::linear_affine(&input, weight, bias, &mut output)?,
    }
    *dims.last_mut().expect("activations have a feature axis") = weight.rows();
    Ok((dims, output))
}

/// A bias of `len` values (if any) must give each of the `out` outputs one.
fn check_bias(len: Option<usize>, out: usize) -> Result<()> {
    match len {
        Some(len) if len != out => {
            Err(Error::InvalidModel(format!("a bias of {len} values does not fit a layer of {out} outputs")))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::Device;

    use super::*;
    use crate::engine::kernels::WeightDType;

    /// The host kernels and candle's product (the path an accelerator takes, here on the CPU)
    /// agree on a stacked f32 layer with a bias, whole and split into parts.
    #[test]
    fn host_and_device_layers_agree() {
        let (out, cols) = (6, 5);
        let weights: Vec<f32> = (0..out * cols).map(|i| ((i * 7 % 11) as f32 - 5.0) / 8.0).collect();
        let bias: Vec<f32> = (0..out).map(|i| i as f32 / 4.0).collect();
        let bytes: Vec<u8> = weights.iter().flat_map(|w| w.to_le_bytes()).collect();
        let matrix =
            WeightMatrix::new(Arc::new(bytes), 0..out * cols * 4, out, cols, WeightDType::F32).unwrap();
        let host = Linear::new(matrix, Some(bias.clone())).unwrap();
        let device = Linear::on_device(
            Tensor::from_vec(weights, (out, cols), &Device::Cpu).unwrap(),
            Some(Tensor::from_vec(bias, out, &Device::Cpu).unwrap()),
        )
        .unwrap();
        let x = Tensor::from_vec(
            (0..2 * 3 * cols).map(|i| i as f32 / 10.0).collect::<Vec<_>>(),
            (2, 3, cols),
            &Device::Cpu,
        )
        .unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (a, b) = (host.forward(&x).unwrap(), device.forward(&x).unwrap());
        assert_eq!(a.dims(), &[2, 3, out]);
        assert_eq!(a.dims(), b.dims());
        for (p, q) in values(&a).iter().zip(values(&b)) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
        let host_parts = host.forward_parts(&x, &[2, 4]).unwrap();
        let device_parts = device.forward_parts(&x, &[2, 4]).unwrap();
        for (p, q) in host_parts.iter().zip(&device_parts) {
            assert_eq!(p.dims(), q.dims());
            for (p, q) in values(p).iter().zip(values(q)) {
                assert!((p - q).abs() < 1e-5, "{p} vs {q}");
            }
        }
        assert!(device.forward_parts(&x, &[2, 2]).is_err());
    }

    #[test]
    fn a_bias_must_fit_the_outputs() {
        let weight = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        let bias = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let message = Linear::on_device(weight, Some(bias)).unwrap_err().to_string();
        assert!(message.contains("a bias of 4 values does not fit a layer of 3 outputs"), "{message}");
    }
}
