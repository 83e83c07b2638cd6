//! `x Wᵀ` for a weight that does not train, as one autograd op whose backward gives only the
//! input's gradient. candle's matmul backward forms the gradient of both operands, so a plain
//! product with a frozen projection costs, every training step, a weight-sized product and a
//! weight-sized buffer that nothing reads.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

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

    /// `x Wᵀ` (`[..., in]` to `[..., out]`), differentiable in `x` only.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1(self.clone())?)
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
        let y = x.broadcast_matmul(&self.weight.t()?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_y.broadcast_matmul(&self.weight)?))
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
