//! A linear layer `y = x Wᵀ + b` whose weight stays in its checkpoint dtype and is read by
//! the SIMD kernels straight from memory; several layers that share an input (q/k/v, gate/up)
//! can be one stacked layer whose output is split into their parts.

use candle_core::{DType, Tensor};

use crate::engine::kernels::{self, WeightMatrix};
use crate::error::{Error, Result};

/// Weight `[out_features, in_features]` in the checkpoint's dtype; bias in f32.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: WeightMatrix,
    bias: Option<Vec<f32>>,
}

impl Linear {
    /// A layer over `weight` (`[out, in]`) and an optional bias of `out` values.
    pub fn new(weight: WeightMatrix, bias: Option<Vec<f32>>) -> Result<Self> {
        if let Some(b) = bias.as_ref().filter(|b| b.len() != weight.rows()) {
            return Err(Error::InvalidModel(format!(
                "a bias of {} values does not fit a layer of {} outputs",
                b.len(),
                weight.rows()
            )));
        }
        Ok(Self { weight, bias })
    }

    /// Applies the layer to f32 activations `[.., in]`, returning f32 `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (dims, output) = self.apply(x)?;
        Ok(Tensor::from_vec(output, dims, x.device())?)
    }

    /// Applies the layer and splits its `[.., out]` output along the last axis into
    /// consecutive parts of `widths` (which sum to `out`), each its own contiguous tensor.
    pub fn forward_parts(&self, x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
        let out = self.weight.rows();
        if widths.iter().sum::<usize>() != out {
            return Err(Error::InvalidArgument(format!("parts {widths:?} do not split {out} outputs")));
        }
        let (mut dims, output) = self.apply(x)?;
        let mut start = 0;
        widths
            .iter()
            .map(|&width| {
                let part: Vec<f32> =
                    output.chunks_exact(out).flat_map(|row| &row[start..start + width]).copied().collect();
                start += width;
                *dims.last_mut().expect("activations have a feature axis") = width;
                Ok(Tensor::from_vec(part, dims.clone(), x.device())?)
            })
            .collect()
    }

    /// The output values and their dims.
    fn apply(&self, x: &Tensor) -> Result<(Vec<usize>, Vec<f32>)> {
        let mut dims = x.dims().to_vec();
        let input: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut output = vec![0.0; input.len() / self.weight.cols() * self.weight.rows()];
        kernels::linear(&input, &self.weight, self.bias.as_deref(), &mut output)?;
        *dims.last_mut().expect("activations have a feature axis") = self.weight.rows();
        Ok((dims, output))
    }
}
