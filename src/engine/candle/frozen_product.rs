//! `x Wᵀ` for a weight that does not train, as one autograd op whose backward gives only the
//! input's gradient. candle's matmul backward forms the gradient of both operands, so a plain
//! product with a frozen projection costs, every training step, a weight-sized product and a
//! weight-sized buffer that nothing reads.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor, D};

use crate::engine::kernels::{self, Orientation, SplitMatrix};
use crate::error::Result;

/// A frozen weight `[out, in]` on the host, as the right operand of products: split to bf16
/// parts for AMX ([`SplitMatrix`]) where this CPU has it and the shape is whole tiles, else an
/// f32 tensor for candle's matmul.
#[derive(Clone)]
pub enum FrozenProduct {
    /// Multiplied on AMX by [`kernels::split_product`].
    Split(Arc<SplitMatrix>),
    /// Multiplied by candle's f32 matmul.
    Dense(Tensor),
}

impl FrozenProduct {
    /// Products with `weight` (`[out, in]`, any float dtype; f32 products of its values).
    pub fn new(weight: Tensor) -> Result<Self> {
        let weight = weight.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
        let (rows, cols) = weight.dims2()?;
        let split = match (&*weight.storage_and_layout().0, weight.layout().contiguous_offsets()) {
            (Storage::Cpu(values), Some((start, end))) => {
                SplitMatrix::new(&values.as_slice::<f32>()?[start..end], (rows, cols))
            }
            _ => None,
        };
        Ok(match split {
            Some(split) => Self::Split(Arc::new(split)),
            None => Self::Dense(weight),
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Self::Split(w) => w.rows(),
            Self::Dense(w) => w.dim(0).unwrap_or(0),
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Self::Split(w) => w.cols(),
            Self::Dense(w) => w.dim(1).unwrap_or(0),
        }
    }

    /// `x Wᵀ` (`[..., in]` to `[..., out]`), differentiable in `x` only.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1(self.clone())?)
    }

    /// `x Wᵀ` of rows `x` (`[..., in]`), tracking nothing.
    pub fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Split(w) => split_product(w, x, Orientation::Transposed),
            Self::Dense(w) => x.broadcast_matmul(&w.t()?),
        }
    }

    /// `g W` (`[..., out]` to `[..., in]`): the input's gradient given the output's.
    pub fn input_gradient(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Split(w) => split_product(w, g, Orientation::AsStored),
            Self::Dense(w) => g.broadcast_matmul(w),
        }
    }
}

/// The product of `x`'s rows (f32 on the host) with `w` in `orientation`.
fn split_product(w: &SplitMatrix, x: &Tensor, orientation: Orientation) -> candle_core::Result<Tensor> {
    let (inner, outer) = orientation.widths((w.rows(), w.cols()));
    if x.dim(D::Minus1)? != inner {
        candle_core::bail!(
            "rows of {} values do not meet a {}x{} weight",
            x.dim(D::Minus1)?,
            w.rows(),
            w.cols()
        )
    }
    let input = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut out = vec![0f32; input.len() / inner * outer];
    if !kernels::split_product(&input, w, orientation, &mut out) {
        candle_core::bail!("{} values do not fit rows of {inner}", input.len())
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("a product's input has an axis") = outer;
    Tensor::from_vec(out, dims, &Device::Cpu)
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

    /// For a weight candle multiplies (not whole tiles) and one split for AMX where the CPU has
    /// it (whole tiles, bf16 parts: within the kernels' bound, `Σ|x·w|·2⁻¹⁵`, about 1e-3 for
    /// sums of 64 such terms).
    #[test]
    fn the_product_and_the_input_gradient_equal_a_plain_matmul() {
        let device = Device::Cpu;
        for ((out, input), tolerance) in [((5, 3), 1e-6), ((64, 32), 1e-3)] {
            let weight = Tensor::randn(0f32, 1.0, (out, input), &device).unwrap();
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4, input), &device).unwrap()).unwrap();
            let frozen = FrozenProduct::new(weight.clone()).unwrap();
            let split =
                crate::engine::kernels::Isa::detect() == crate::engine::kernels::Isa::Amx && out == 64;
            assert_eq!(matches!(frozen, FrozenProduct::Split(_)), split, "{out}x{input}");
            let y = frozen.apply(x.as_tensor()).unwrap();
            let expected = x.as_tensor().broadcast_matmul(&weight.t().unwrap()).unwrap();
            let difference = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!(difference(&y, &expected) < tolerance, "{out}x{input}: {}", difference(&y, &expected));
            // Any upstream gradient, not only ones.
            let upstream = Tensor::randn(0f32, 1.0, (2, 4, out), &device).unwrap();
            let grads = (y * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            let plain = (expected * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            let (grad, plain) = (grads.get(x.as_tensor()).unwrap(), plain.get(x.as_tensor()).unwrap());
            assert!(difference(grad, plain) < tolerance, "{out}x{input}: {}", difference(grad, plain));
        }
    }
}
