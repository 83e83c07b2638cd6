//! `x Wᵀ` for a weight that does not train, as one autograd op whose backward gives only the
//! input's gradient. candle's matmul backward forms the gradient of both operands, so a plain
//! product with a frozen projection costs, every training step, a weight-sized product and a
//! weight-sized buffer that nothing reads.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor, D};

use crate::engine::kernels::{self, Orientation};
use crate::error::Result;

/// A frozen f32 weight `[out, in]` on the host, as the right operand of products.
#[derive(Clone)]
pub struct FrozenProduct {
    weight: Tensor,
}

impl FrozenProduct {
    /// Products with `weight` (`[out, in]`).
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }

    /// `x Wᵀ` (`[..., in]` to `[..., out]`), differentiable in `x` only.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1(self.clone())?)
    }

    /// `x Wᵀ` of rows `x` (`[..., in]`), tracking nothing.
    pub fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.split_product(x, Orientation::Transposed)? {
            Some(y) => Ok(y),
            None => x.broadcast_matmul(&self.weight.t()?),
        }
    }

    /// `g W` (`[..., out]` to `[..., in]`): the input's gradient given the output's.
    pub fn input_gradient(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        match self.split_product(g, Orientation::AsStored)? {
            Some(y) => Ok(y),
            None => g.broadcast_matmul(&self.weight),
        }
    }

    /// The product on AMX's split-f32 kernel ([`kernels::split_f32_product`]), or `None`
    /// where that kernel does not take it (and candle's matmul does).
    fn split_product(&self, x: &Tensor, orientation: Orientation) -> candle_core::Result<Option<Tensor>> {
        let (n, k) = (self.rows(), self.cols());
        let (inner, outer) = orientation.widths((n, k));
        if x.dtype() != DType::F32
            || self.weight.dtype() != DType::F32
            || !x.device().is_cpu()
            || x.dim(D::Minus1)? != inner
        {
            return Ok(None);
        }
        let (storage, layout) = self.weight.storage_and_layout();
        let (Storage::Cpu(weights), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
            return Ok(None);
        };
        let input = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; input.len() / inner * outer];
        let w = &weights.as_slice::<f32>()?[start..end];
        if !kernels::split_f32_product(&input, w, (n, k), orientation, &mut out) {
            return Ok(None);
        }
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("a product's input has an axis") = outer;
        Ok(Some(Tensor::from_vec(out, dims, &Device::Cpu)?))
    }
}

impl CustomOp1 for FrozenProduct {
    fn name(&self) -> &'static str {
        "frozen-product"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("a frozen product takes a contiguous input")
        };
        let x = Tensor::from_slice(&storage.as_slice::<f32>()?[start..end], layout.shape(), &Device::Cpu)?;
        let y = self.product(&x)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.input_gradient(grad_y)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    #[test]
    fn the_product_and_the_input_gradient_equal_a_plain_matmul() {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (5, 3), &device).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4, 3), &device).unwrap()).unwrap();
        let frozen = FrozenProduct::new(weight.clone());
        let y = frozen.apply(x.as_tensor()).unwrap();
        let expected = x.as_tensor().broadcast_matmul(&weight.t().unwrap()).unwrap();
        let difference = |a: &Tensor, b: &Tensor| {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(difference(&y, &expected) < 1e-6);
        // Any upstream gradient, not only ones.
        let upstream = Tensor::randn(0f32, 1.0, (2, 4, 5), &device).unwrap();
        let grads = (y * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        let plain = (expected * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = grads.get(x.as_tensor()).unwrap();
        assert!(difference(grad, plain.get(x.as_tensor()).unwrap()) < 1e-6);
    }
}
