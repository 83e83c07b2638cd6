//! A frozen weight of the training path: an f32 copy of a float checkpoint's weight
//! ([`FrozenProduct`]), or a quantized checkpoint's weight as stored ([`QuantizedProduct`]).

use candle_core::Tensor;

use super::frozen_product::FrozenProduct;
use super::quantized_product::QuantizedProduct;
use crate::error::Result;

/// A weight `[out, in]` that does not train, as the right operand of products.
#[derive(Clone)]
pub enum FrozenWeight {
    /// An f32 copy of a float weight.
    Float(FrozenProduct),
    /// Quantized rows, dequantized a chunk at a time.
    Quantized(QuantizedProduct),
}

impl FrozenWeight {
    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Self::Float(w) => w.rows(),
            Self::Quantized(w) => w.rows(),
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Self::Float(w) => w.cols(),
            Self::Quantized(w) => w.cols(),
        }
    }

    /// `x Wᵀ` (`[..., in]` to `[..., out]`), differentiable in `x` only.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Float(w) => w.apply(x),
            Self::Quantized(w) => w.apply(x),
        }
    }

    /// `x Wᵀ` of rows `x` (`[..., in]`), tracking nothing.
    pub fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Float(w) => w.product(x),
            Self::Quantized(w) => w.product(x),
        }
    }

    /// `g W` (`[..., out]` to `[..., in]`): the input's gradient given the output's.
    pub fn input_gradient(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Float(w) => w.input_gradient(g),
            Self::Quantized(w) => w.input_gradient(g),
        }
    }
}
