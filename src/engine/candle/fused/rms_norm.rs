//! RMS norm over the last axis with a frozen weight, as transformers computes it in f32:
//! `y = w · x · r` with `r = 1 / sqrt(mean(x²) + eps)`. Its backward pass gives
//! `dx = r · (w·g) - x · r³ / n · Σ (w·g·x)` for each row.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{dot, input_values, with_values};
use crate::error::Result;

/// An RMS norm whose weight does not train.
#[derive(Clone)]
pub struct RmsNorm {
    weight: Arc<[f32]>,
    eps: f32,
}

impl RmsNorm {
    /// The norm with `weight` (`[width]`, any float dtype).
    pub fn new(weight: &Tensor, eps: f64) -> Result<Self> {
        let weight = with_values(weight, |values| Ok(Arc::from(values)))?;
        Ok(Self { weight, eps: eps as f32 })
    }

    /// `x` (`[..., width]`, f32, on the host) normed over its last axis, differentiable in `x`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1(self.clone())?)
    }

    /// `1 / sqrt(mean(row²) + eps)`.
    fn inverse_rms(&self, row: &[f32]) -> f32 {
        (dot(row, row) / row.len() as f32 + self.eps).sqrt().recip()
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = input_values(storage, layout, "an RMS norm")?;
        let width = self.weight.len();
        if layout.dims().last() != Some(&width) {
            candle_core::bail!("an RMS norm of width {width} got rows of shape {:?}", layout.dims())
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(width).zip(x.par_chunks(width)).for_each(|(y, x)| {
            let r = self.inverse_rms(x);
            for ((y, x), w) in y.iter_mut().zip(x).zip(self.weight.iter()) {
                *y = w * (x * r);
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let width = self.weight.len();
        let grad = with_values(x, |x| {
            with_values(grad_y, |g| {
                let mut grad = vec![0f32; x.len()];
                grad.par_chunks_mut(width).zip(x.par_chunks(width).zip(g.par_chunks(width))).for_each(
                    |(dx, (x, g))| {
                        let r = self.inverse_rms(x);
                        let weighted: f32 =
                            x.iter().zip(g).zip(self.weight.iter()).map(|((x, g), w)| x * g * w).sum();
                        let along_x = r * r * r / width as f32 * weighted;
                        for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(self.weight.iter()) {
                            *dx = r * w * g - along_x * x;
                        }
                    },
                );
                Ok(grad)
            })
        })?;
        Ok(Some(Tensor::from_vec(grad, x.dims(), &Device::Cpu)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Var, D};

    use super::super::assert_same_op;
    use super::*;

    /// The norm from separate candle ops, which autograd differentiates.
    fn composed(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
        let scale = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        x.broadcast_mul(&scale).unwrap().broadcast_mul(weight).unwrap()
    }

    #[test]
    fn equals_the_composed_norm_and_its_gradient() {
        let device = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 5, 3, 24), &device).unwrap()).unwrap();
        let weight = Tensor::randn(1f32, 0.5, 24, &device).unwrap();
        let norm = RmsNorm::new(&weight, 1e-5).unwrap();
        let ours = norm.apply(x.as_tensor()).unwrap();
        let reference = composed(x.as_tensor(), &weight, 1e-5);
        assert_same_op(ours, reference, &[x.as_tensor()], 1e-5);
    }

    #[test]
    fn refuses_rows_of_another_width() {
        let norm =
            RmsNorm::new(&Tensor::ones(8, candle_core::DType::F32, &Device::Cpu).unwrap(), 1e-5).unwrap();
        let x = Tensor::ones((2, 6), candle_core::DType::F32, &Device::Cpu).unwrap();
        let message = norm.apply(&x).unwrap_err().to_string();
        assert!(message.contains("an RMS norm of width 8 got rows of shape [2, 6]"), "{message}");
    }
}
