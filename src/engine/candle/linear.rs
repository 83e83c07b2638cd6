//! A linear layer `y = x Wᵀ + b` whose weight stays in its checkpoint dtype: on the host it is
//! read by the SIMD kernels straight from memory, on an accelerator it is a device tensor
//! multiplied by candle (cuBLAS on CUDA). Several layers that share an input (q/k/v, gate/up)
//! can be one stacked layer whose output is split into their parts.

use candle_core::{DType, Tensor};

use crate::engine::kernels::{self, WeightMatrix};
use crate::error::{Error, Result};

/// Weight `[out_features, in_features]` in the checkpoint's dtype; bias in f32.
#[derive(Debug, Clone)]
pub enum Linear {
    /// In host memory, multiplied by the SIMD kernels.
    Host { weight: WeightMatrix, bias: Option<Vec<f32>> },
    /// On an accelerator, multiplied by candle; activations are cast to the weight's dtype
    /// for the product (accumulated in f32 by cuBLAS) and back to f32 after it.
    Device { weight: Tensor, bias: Option<Tensor> },
}

impl Linear {
    /// A host layer over `weight` (`[out, in]`) and an optional bias of `out` values.
    pub fn new(weight: WeightMatrix, bias: Option<Vec<f32>>) -> Result<Self> {
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

    /// Output features.
    fn rows(&self) -> usize {
        match self {
            Self::Host { weight, .. } => weight.rows(),
            Self::Device { weight, .. } => weight.dim(0).expect("a device weight is 2-D"),
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
            Self::Device { .. } => {
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

/// `x Wᵀ + b` by the host kernels: the output values and their dims.
fn host_product(weight: &WeightMatrix, bias: Option<&[f32]>, x: &Tensor) -> Result<(Vec<usize>, Vec<f32>)> {
    let mut dims = x.dims().to_vec();
    let input: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut output = vec![0.0; input.len() / weight.cols() * weight.rows()];
    kernels::linear(&input, weight, bias, &mut output)?;
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
