//! `x Wᵀ` for a weight that does not train, as one autograd op whose backward gives only the
//! input's gradient. candle's matmul backward forms the gradient of both operands, so a plain
//! product with a frozen projection costs, every training step, a weight-sized product and a
//! weight-sized buffer that nothing reads.
//!
//! The weight is a float checkpoint's, split for the products ([`FrozenProduct`]), or a quantized
//! checkpoint's weight as stored ([`QuantizedProduct`]).

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

use super::frozen_product::FrozenProduct;
use super::fused::{input_values, with_values};
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
        Ok(x.contiguous()?.apply_op1(self.clone())?)
    }

    /// `x Wᵀ` of the rows `x` (each `in` values): rows of `out` values, tracking nothing.
    pub fn product(&self, x: &[f32]) -> candle_core::Result<Vec<f32>> {
        match self {
            Self::Float(w) => w.product(x),
            Self::Quantized(w) => w.product(x),
        }
    }

    /// `g W` of the rows `g` (each `out` values): the input's gradient given the output's, rows
    /// of `in` values.
    pub fn input_gradient(&self, g: &[f32]) -> candle_core::Result<Vec<f32>> {
        match self {
            Self::Float(w) => w.input_gradient(g),
            Self::Quantized(w) => w.input_gradient(g),
        }
    }
}

impl CustomOp1 for FrozenWeight {
    fn name(&self) -> &'static str {
        "frozen-product"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.product(input_values(storage, layout, "a frozen product")?)?;
        let mut dims = layout.dims().to_vec();
        *dims.last_mut().expect("a product's input has an axis") = self.rows();
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let gradient = with_values(grad_y, |g| self.input_gradient(g))?;
        let mut dims = grad_y.dims().to_vec();
        *dims.last_mut().expect("a product's output has an axis") = self.cols();
        Ok(Some(Tensor::from_vec(gradient, dims, &Device::Cpu)?))
    }
}
