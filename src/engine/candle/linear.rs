//! A linear layer `y = x Wᵀ + b` whose weight stays in its checkpoint dtype and is read by
//! the SIMD kernels straight from the memory-mapped checkpoint.

use candle_core::{DType, Tensor};

use crate::engine::kernels::{self, WeightMatrix};
use crate::error::Result;

/// Weight `[out_features, in_features]` in the checkpoint's dtype; bias in f32.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: WeightMatrix,
    bias: Option<Vec<f32>>,
}

impl Linear {
    /// A layer over `weight` (`[out, in]`) and an optional bias (`[out]`).
    pub fn new(weight: WeightMatrix, bias: Option<Tensor>) -> Result<Self> {
        let bias = bias.map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
        Ok(Self { weight, bias })
    }

    /// Applies the layer to f32 activations `[.., in]`, returning f32 `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let input: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut output = vec![0.0; input.len() / self.weight.cols() * self.weight.rows()];
        kernels::linear(&input, &self.weight, self.bias.as_deref(), &mut output)?;
        *dims.last_mut().expect("activations have a feature axis") = self.weight.rows();
        Ok(Tensor::from_vec(output, dims, x.device())?)
    }
}
