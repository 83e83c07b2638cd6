//! A linear layer `y = x Wᵀ + b` whose weight stays in its checkpoint dtype.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// Weight `[out_features, in_features]` in the checkpoint's dtype; bias in f32.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer over `weight` (`[out, in]`) and an optional bias (`[out]`).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        Ok(Self { weight, bias })
    }

    /// Applies the layer to f32 activations `[.., in]`, returning f32 `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = self.weight.dtype();
        let y = x.to_dtype(dtype)?.broadcast_matmul(&self.weight.t()?)?.to_dtype(DType::F32)?;
        match &self.bias {
            Some(bias) => Ok(y.broadcast_add(bias)?),
            None => Ok(y),
        }
    }
}
